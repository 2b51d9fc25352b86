"""LoRA fine-tuning in Tunix's ``PeftTrainer`` with qwix, preconditioned by rplora_jax.

Run ``pip install -e ".[tunix]" && python examples/tunix_peft.py`` (under a minute on 2 CPU
cores). A small Llama 3 that Tunix builds with random weights gets qwix LoRA on its attention
and MLP projections and learns a counting task; ``rplora_jax.scaled_adamw`` is the optimizer,
wrapped in ``optax.inject_hyperparams`` so that Tunix logs its learning rate. The run uses
gradient accumulation, an FSDP mesh over the devices, and a checkpoint directory that a second
run resumes from; it ends by folding the adapter into the base weights for serving and checking
that the merged model computes what the LoRA model does. ``--qlora`` quantizes the frozen
weights to NF4 first (QLoRA; nothing else changes).

The pieces are functions, so ``tests/trainers/test_tunix.py`` runs the same recipe.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections.abc import Iterator

import jax
import numpy as np
import optax
import qwix
from flax import nnx
from tunix.models import dummy_model_creator
from tunix.models.llama3 import model as llama3
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

import rplora_jax

CONFIG = llama3.ModelConfig(
    num_layers=2,
    vocab_size=64,
    embed_dim=64,
    hidden_dim=128,
    num_heads=4,
    head_dim=16,
    num_kv_heads=2,
    rope_theta=10_000,
    norm_eps=1e-5,
)
TARGETS = ".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
RANK, ALPHA = 4, 8.0
SEQ_LEN, BATCH = 32, 8


def base_model(mesh: jax.sharding.Mesh | None = None) -> llama3.Llama3:
    """The frozen model: Tunix's Llama 3 with random weights (seed 0), sharded over ``mesh``."""
    return dummy_model_creator.create_dummy_model(llama3.Llama3, CONFIG, mesh, scale=0.2)


def lora_model(
    mesh: jax.sharding.Mesh | None = None, *, targets: str = TARGETS, qlora: bool = False
) -> llama3.Llama3:
    """``base_model`` with qwix LoRA (rank 4, alpha 8) on the projections ``targets`` matches.

    ``qlora`` stores the frozen weights in NF4 (tiles of 16 along the contracted axis).
    """
    quant = {"weight_qtype": "nf4", "tile_size": 16} if qlora else {}
    provider = qwix.LoraProvider(module_path=targets, rank=RANK, alpha=ALPHA, **quant)
    model = base_model(mesh)
    return qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(1), **model.get_model_input())


def batches(steps: int, seed: int = 0) -> Iterator[peft_trainer.TrainingInput]:
    """``steps`` batches of counting sequences (``k, k+1, ...`` over tokens 1..63)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        start = rng.integers(0, 63, size=(BATCH, 1))
        tokens = ((start + np.arange(SEQ_LEN)) % 63 + 1).astype(np.int32)
        yield peft_trainer.TrainingInput(input_tokens=tokens, input_mask=np.ones_like(tokens, bool))


def model_inputs(batch: peft_trainer.TrainingInput) -> dict[str, jax.Array]:
    """What Tunix's default loss takes: tokens, mask, positions and a causal attention mask."""
    valid = batch.input_tokens != 0
    return {
        "input_tokens": batch.input_tokens,
        "input_mask": batch.input_mask,
        "positions": sft_utils.build_positions_from_mask(valid),
        "attention_mask": sft_utils.make_causal_attn_mask(valid),
    }


def optimizer(steps: int, peak: float = 1e-2) -> optax.GradientTransformation:
    """Scaled AdamW on a warmup-cosine schedule; the outer ``inject_hyperparams`` lets Tunix log
    the rate (wrapping only the AdamW part of a chain trains the same but logs none)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10), steps)
    # No weight decay: a short run on a task the factors fit exactly (the default is 1e-4).
    return optax.inject_hyperparams(rplora_jax.scaled_adamw)(
        learning_rate=schedule, weight_decay=0.0
    )


def trainer(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    steps: int,
    *,
    accumulation: int | None = None,
    checkpoints: str | None = None,
) -> peft_trainer.PeftTrainer:
    """A ``PeftTrainer`` that stops after ``steps`` optimizer steps; it resumes from the latest
    checkpoint in ``checkpoints`` when there is one."""
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10**9,
        max_steps=steps,
        gradient_accumulation_steps=accumulation,
        checkpoint_root_directory=checkpoints,
        pbar_description=None,
    )
    return peft_trainer.PeftTrainer(model, tx, config).with_gen_model_input_fn(model_inputs)


def held_out_loss(model: nnx.Module) -> float:
    """Next-token cross-entropy on 4 batches the training never sees (seed 99)."""
    # PeftTrainer's default loss (it has no public name): the held-out figure is what it trains.
    losses = [
        peft_trainer._default_loss_fn(model, **model_inputs(batch)) for batch in batches(4, seed=99)
    ]
    return float(np.mean(losses))


def merged_for_serving(model: nnx.Module) -> llama3.Llama3:
    """The base model with ``W0 + (alpha / rank) a @ b`` in place of every adapted weight."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # LoRAParam is an nnx.Param
    serving = base_model()
    state = nnx.state(serving, nnx.Param)
    nnx.replace_by_pure_dict(state, rplora_jax.merge(params, scale=ALPHA / RANK))
    nnx.update(serving, state)
    return serving


def logits(model: nnx.Module) -> np.ndarray:
    inputs = model_inputs(next(batches(1, seed=99)))
    out, _ = model(inputs["input_tokens"], inputs["positions"], None, inputs["attention_mask"])
    return np.asarray(out)


def fsdp_mesh() -> jax.sharding.Mesh:
    """An ``("fsdp", "tp")`` mesh over as many devices as split the batch evenly (all, usually)."""
    n = math.gcd(jax.device_count(), BATCH)
    auto = (jax.sharding.AxisType.Auto,) * 2  # Tunix's models shard with Auto mesh axes
    return jax.make_mesh((n, 1), ("fsdp", "tp"), axis_types=auto, devices=jax.devices()[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--qlora", action="store_true", help="NF4 base weights (QLoRA)")
    args = parser.parse_args()

    mesh = fsdp_mesh()
    print(f"mesh: fsdp={mesh.shape['fsdp']}, tp={mesh.shape['tp']}")
    with jax.set_mesh(mesh), tempfile.TemporaryDirectory() as checkpoints:
        model = lora_model(mesh, qlora=args.qlora)
        print(f"held-out loss before: {held_out_loss(model):.3f}")
        tx = optimizer(args.steps)
        half = trainer(model, tx, args.steps // 2, accumulation=2, checkpoints=checkpoints)
        half.train(batches(2 * args.steps))
        # A new process would do exactly this: a fresh model, the same directory, and the same
        # data stream from its start (Tunix skips the batches the checkpoint has used).
        model = lora_model(mesh, qlora=args.qlora)
        run = trainer(model, tx, args.steps, accumulation=2, checkpoints=checkpoints)
        run_start = run.train_steps
        print(f"resumed at step {run_start} of {args.steps}")
        run.train(batches(2 * args.steps))
        rates = run.metrics_logger.get_metric_history("", "learning_rate", "train")
        print(f"held-out loss after {args.steps} steps: {held_out_loss(model):.3f}")
        print(f"rate logged by Tunix from step {run_start}: {rates[0]:.2e} to {rates[-1]:.2e}")
    if not args.qlora:
        gap = np.abs(logits(merged_for_serving(model)) - logits(model)).max()
        print(f"merged for serving: logits within {gap:.1e} of the LoRA model's")


if __name__ == "__main__":
    main()
