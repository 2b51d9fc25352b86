"""Cost of the preconditioner in a full training step on the real model (all-MiniLM-L6-v2).

A jitted step (forward, backward, optimizer update; trainable params and optimizer state
donated) of the LoRA classifier from ``experiments/finetune_classification.py`` (LoRA injected
with ``rplora_jax.inject_linen``, base frozen with ``rplora_jax.freeze_base``), with
``rplora_jax.scaled_adamw`` and with ``optax.adamw``. Each is timed ``--repeats`` times after
warm-up, alternating between the two so background load hits both alike; the medians and their
ratio are printed, for two settings:

* rank 8 on query, value (the fine-tuning experiments' setting);
* rank 64 on every linear layer of every block.

Run from the repository root (it imports :mod:`experiments`)::

    python -m benchmarks.train_step_overhead [--repeats 20] [--batch-size 32] [--length 64]
    python -m benchmarks.train_step_overhead --settings rank64_all   # one setting only
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
from experiments.models import bert

#: name -> (LoRA options, targeted projections of every layer).
SETTINGS = {
    "rank8_qv": (rplora_jax.LoRAConfig(rank=8), ("query", "value")),
    "rank64_all": (rplora_jax.LoRAConfig(rank=64), bert.LORA_TARGETS),
}


def make_step(model, tx):
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def bench(
    lora: rplora_jax.LoRAConfig,
    targets: tuple[str, ...],
    batch: dict,
    repeats: int,
    warmup: int = 3,
) -> dict[str, float]:
    model, params = bert.load_pretrained(lora=lora, targets=targets, num_classes=2)
    # Give lora_b non-zero values, as after the first steps, so no Gram is singular.
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.01 if p[-1].key == "lora_b" else x, params
    )
    txs = {
        name: rplora_jax.freeze_base(tx, also_train=bert.HEAD)
        for name, tx in (
            ("adamw", optax.adamw(1e-4, weight_decay=1e-4)),
            ("scaled_adamw", rplora_jax.scaled_adamw(1e-4, weight_decay=1e-4)),
        )
    }
    state = {}
    for name, tx in txs.items():
        p = jax.tree.map(jnp.copy, params)  # each step donates its own copy
        state[name] = [make_step(model, tx), p, tx.init(p)]
    times: dict[str, list[float]] = {n: [] for n in txs}
    for i in range(warmup + repeats):
        for name in txs:
            step, p, st = state[name]
            start = time.perf_counter()
            p, st, loss = step(p, st, batch)
            jax.block_until_ready((p, st, loss))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
            state[name][1:] = [p, st]
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
    batch = jax.device_put(batch)  # on the device once: no host copy inside the timed steps
    print(
        f"batch {args.batch_size} x {args.length} tokens, {jax.devices()[0].platform}, "
        f"median of {args.repeats} after warm-up"
    )
    for name in args.settings:
        lora, targets = SETTINGS[name]
        med = bench(lora, targets, batch, args.repeats)
        label = f"rank {lora.rank} on {','.join(targets)}"
        print(
            f"{label:>44}: adamw {1e3 * med['adamw']:8.1f} ms   scaled_adamw "
            f"{1e3 * med['scaled_adamw']:8.1f} ms   ratio {med['scaled_adamw'] / med['adamw']:.3f}"
        )


if __name__ == "__main__":
    main()
