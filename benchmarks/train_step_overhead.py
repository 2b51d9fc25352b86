"""Cost of the preconditioner in a full training step on the real model (all-MiniLM-L6-v2).

A jitted step (forward, backward, optimizer update; trainable params and optimizer state
donated) of the LoRA classifier from ``experiments/finetune_classification.py``, with
``rplora_jax.scaled_adamw`` and with ``optax.adamw``. Each is timed ``--repeats`` times after
warm-up, alternating between the two so background load hits both alike; the medians and their
ratio are printed, for two settings:

* rank 8 on query, value (the fine-tuning experiments' setting);
* rank 64 on every linear layer of every block.

    python benchmarks/train_step_overhead.py [--repeats 20] [--batch-size 32] [--length 64]
    python benchmarks/train_step_overhead.py --settings rank64_all   # one setting only
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rplora_jax
from rplora_jax.models import bert

SETTINGS = {
    "rank8_qv": bert.LoRAConfig(rank=8, targets=("query", "value")),
    "rank64_all": bert.LoRAConfig(rank=64, targets=bert.LORA_TARGETS),
}


def make_step(model, tx):
    def loss_fn(trainable, frozen, batch):
        params = bert.merge_params(trainable, frozen)
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(trainable, opt_state, frozen, batch):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def bench(lora: bert.LoRAConfig, batch: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    model, params = bert.load_pretrained(lora=lora, num_classes=2)
    trainable, frozen = bert.split_trainable(params)
    # Give lora_b non-zero values, as after the first steps, so no Gram is singular.
    trainable = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, trainable
    )
    txs = {
        "adamw": optax.adamw(1e-4, weight_decay=1e-4),
        "scaled_adamw": rplora_jax.scaled_adamw(1e-4, weight_decay=1e-4),
    }
    state = {}
    for name, tx in txs.items():
        tr = jax.tree.map(jnp.copy, trainable)
        state[name] = [make_step(model, tx), tr, tx.init(tr)]
    times: dict[str, list[float]] = {n: [] for n in txs}
    for i in range(warmup + repeats):
        for name in txs:
            step, tr, st = state[name]
            start = time.perf_counter()
            tr, st, loss = step(tr, st, frozen, batch)
            jax.block_until_ready((tr, st, loss))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            state[name][1:] = [tr, st]
    return {n: statistics.median(t) for n, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = p.parse_args()
    rng = np.random.default_rng(0)
    batch = {
        "input_ids": rng.integers(1000, 30000, (args.batch_size, args.length), dtype=np.int32),
        "attention_mask": np.ones((args.batch_size, args.length), np.int32),
        "labels": rng.integers(0, 2, args.batch_size, dtype=np.int32),
    }
    print(
        f"batch {args.batch_size} x {args.length} tokens, {jax.devices()[0].platform}, "
        f"median of {args.repeats} after warm-up"
    )
    for name in args.settings:
        lora = SETTINGS[name]
        med = bench(lora, batch, args.repeats)
        label = f"rank {lora.rank} on {','.join(lora.targets)}"
        print(
            f"{label:>44}: adamw {1e3 * med['adamw']:8.1f} ms   scaled_adamw "
            f"{1e3 * med['scaled_adamw']:8.1f} ms   ratio {med['scaled_adamw'] / med['adamw']:.3f}"
        )


if __name__ == "__main__":
    main()
