"""Cost of the preconditioner: jitted optimizer update, scaled_adamw vs optax.adamw.

Both optimizers update the same LoRA parameters (update + apply_updates, buffers donated); the
median of repeated runs after warm-up (the two alternate step by step) is printed for each, with
their ratio measured in this run.
Also prints compile time of both updates for a growing number of pairs.

    python benchmarks/update_overhead.py [--repeats 20] [--skip-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import rplora_jax

SETS = {
    "(a) 48 pairs 1024x4 / 4x1024 (GPT-2-medium q,v)": (48, 1024, 4),
    "(b) 128 pairs 4096x16 / 16x4096 (7B q,k,v,o)": (128, 4096, 16),
}


def make_params(n_pairs: int, width: int, rank: int, seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), 2 * n_pairs)
    return {
        f"layer_{i}": {
            "lora_a": jax.random.normal(keys[2 * i], (width, rank)) / width**0.5,
            "lora_b": jax.random.normal(keys[2 * i + 1], (rank, width)) * 0.01,
        }
        for i in range(n_pairs)
    }


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def time_updates(txs: dict, params, grads, repeats: int) -> dict[str, float]:
    """Median step time of each optimizer; they alternate step by step so that changes in the
    machine's load hit all of them alike."""
    runs = {}
    for name, tx in txs.items():
        p = jax.tree.map(jnp.copy, params)
        runs[name] = [make_step(tx), p, tx.init(p)]
    times: dict[str, list[float]] = {name: [] for name in txs}
    for i in range(repeats + 3):
        for name, run in runs.items():
            step, p, state = run
            start = time.perf_counter()
            p, state = step(p, state, grads)
            jax.block_until_ready(p)
            if i >= 3:  # warm-up: compilation and first-touch allocations
                times[name].append(time.perf_counter() - start)
            run[1:] = [p, state]
    return {name: statistics.median(t) for name, t in times.items()}


def compile_time(tx: optax.GradientTransformation, n_pairs: int) -> float:
    params = make_params(n_pairs, 64, 4)
    state = tx.init(params)
    start = time.perf_counter()
    make_step(tx).lower(params, state, params).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} device(s)")
    for name, (n, width, rank) in SETS.items():
        params = make_params(n, width, rank)
        grads = make_params(n, width, rank, seed=1)
        txs = {"adamw": optax.adamw(1e-3), "scaled_adamw": rplora_jax.scaled_adamw(1e-3)}
        medians = time_updates(txs, params, grads, args.repeats)
        base, scaled = medians["adamw"], medians["scaled_adamw"]
        print(
            f"{name}: adamw {base * 1e3:.2f} ms, scaled_adamw {scaled * 1e3:.2f} ms, "
            f"ratio {scaled / base:.2f}"
        )
    if not args.skip_compile:
        for n in (32, 128, 512):
            base = compile_time(optax.adamw(1e-3), n)
            scaled = compile_time(rplora_jax.scaled_adamw(1e-3), n)
            print(
                f"compile, {n} pairs of 64x4: adamw {base:.2f} s, scaled_adamw {scaled:.2f} s, "
                f"ratio {scaled / base:.1f}"
            )


if __name__ == "__main__":
    main()
