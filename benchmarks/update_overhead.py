"""Cost of the preconditioner: jitted optimizer update, scaled_adamw vs optax.adamw.

Both optimizers update the same LoRA parameters (update + apply_updates, buffers donated); the
median of repeated runs after warm-up is printed for each, with their ratio measured in this run.
Also prints compile time of the scaled_adamw update for a growing number of pairs.

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


def time_update(tx, params, grads, repeats: int) -> float:
    params = jax.tree.map(jnp.copy, params)
    state = tx.init(params)
    step = make_step(tx)
    for _ in range(3):
        params, state = step(params, state, grads)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, state = step(params, state, grads)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compile_time(n_pairs: int) -> float:
    params = make_params(n_pairs, 64, 4)
    tx = rplora_jax.scaled_adamw(1e-3)
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
        base = time_update(optax.adamw(1e-3), params, grads, args.repeats)
        scaled = time_update(rplora_jax.scaled_adamw(1e-3), params, grads, args.repeats)
        print(
            f"{name}: adamw {base * 1e3:.2f} ms, scaled_adamw {scaled * 1e3:.2f} ms, "
            f"ratio {scaled / base:.2f}"
        )
    if not args.skip_compile:
        for n in (32, 128, 512):
            print(f"compile scaled_adamw update, {n} pairs: {compile_time(n):.2f} s")


if __name__ == "__main__":
    main()
