"""Data-parallel LoRA training: the classic ``pmap`` + ``lax.pmean`` loop and its ``jit`` twin.

``jax.pmap`` is in maintenance mode in current JAX; new code should use ``jax.jit`` with a mesh
(second half of this file), which does the same with replicated parameters and a batch sharded over
``data``. Both loops run scaled AdamW on the same data; the script checks they agree.

In the pmap loop every device holds the full factors, so after ``pmean`` of the gradients the
preconditioner runs locally with no ``axis_name``: each device's Grams are already the full ones.

    python examples/pmap_data_parallel.py            # CPU: 8 virtual devices
"""

from __future__ import annotations

import argparse
import functools
import time

import jax

BATCH, D_IN, D_OUT, RANK = 64, 32, 16, 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--cpu-devices", type=int, default=8)
    return parser.parse_args(argv)


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rplora_jax  # noqa: E402

_TEACHER = np.random.default_rng(7).standard_normal((D_IN, D_OUT)).astype(np.float32) / 4


def init(seed: int = 0) -> tuple[jax.Array, dict]:
    """Frozen kernel and LoRA factors (``b = 0``)."""
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.standard_normal((D_IN, D_OUT)) / D_IN**0.5, jnp.float32)
    lora = {
        "lora_a": jnp.asarray(rng.standard_normal((D_IN, RANK)) / D_IN**0.5, jnp.float32),
        "lora_b": jnp.zeros((RANK, D_OUT), jnp.float32),
    }
    return kernel, lora


def batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng([1, step]).standard_normal((BATCH, D_IN)).astype(np.float32)
    return x, np.tanh(x @ _TEACHER)


def loss_fn(lora: dict, kernel: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    pred = x @ kernel + (x @ lora["lora_a"]) @ lora["lora_b"]
    return jnp.mean((pred - y) ** 2)


# ---- pmap: one program per device, explicit collectives ------------------------------------
def train_pmap(steps: int, lr: float) -> tuple[dict, list[float]]:
    n = jax.local_device_count()
    tx = rplora_jax.scaled_adamw(lr)
    kernel, lora = init()
    opt_state = tx.init(lora)
    # Replicate: a leading device axis on every leaf (pmap splits it over the devices).
    replicate = lambda tree: jax.tree.map(lambda v: jnp.broadcast_to(v, (n, *v.shape)), tree)
    kernel, lora, opt_state = replicate(kernel), replicate(lora), replicate(opt_state)

    @functools.partial(jax.pmap, axis_name="batch", donate_argnums=(0, 1))
    def step_fn(lora, opt_state, kernel, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(lora, kernel, x, y)
        # Mean of equal-sized shard means = global-batch mean.
        grads, loss = jax.lax.pmean((grads, loss), "batch")
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for step in range(steps):
        x, y = batch(step)
        x, y = x.reshape(n, BATCH // n, D_IN), y.reshape(n, BATCH // n, D_OUT)
        lora, opt_state, loss = step_fn(lora, opt_state, kernel, x, y)
        losses.append(float(loss[0]))
    return jax.tree.map(lambda v: v[0], lora), losses


# ---- jit: one global program, XLA inserts the gradient all-reduce --------------------------
def train_jit(steps: int, lr: float) -> tuple[dict, list[float]]:
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(auto,))
    replicated, by_rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    tx = rplora_jax.scaled_adamw(lr)
    kernel, lora = jax.device_put(init(), replicated)
    opt_state = tx.init(lora)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step_fn(lora, opt_state, kernel, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(lora, kernel, x, y)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for step in range(steps):
        x, y = jax.device_put(batch(step), by_rows)
        lora, opt_state, loss = step_fn(lora, opt_state, kernel, x, y)
        losses.append(float(loss))
    return lora, losses


def run(steps: int = 20, lr: float = 1e-2) -> dict:
    """Both loops; returns their losses and the largest relative difference of the factors."""
    if BATCH % jax.device_count():
        raise SystemExit(
            f"The global batch of {BATCH} rows must split evenly over {jax.device_count()} "
            "devices: run on a device count that divides it (--cpu-devices on CPU)."
        )
    lora_p, losses_p = train_pmap(steps, lr)
    lora_j, losses_j = train_jit(steps, lr)
    rel = max(
        float(jnp.max(jnp.abs(lora_p[k] - lora_j[k])) / jnp.max(jnp.abs(lora_j[k]))) for k in lora_j
    )
    return {
        "devices": jax.device_count(),
        "losses_pmap": losses_p,
        "losses_jit": losses_j,
        "max_rel_diff": rel,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    start = time.perf_counter()
    report = run(args.steps, args.lr)
    print(f"jax {jax.__version__}, {report['devices']} {jax.default_backend()} devices")
    print(f"pmap + pmean: loss {report['losses_pmap'][0]:.5f} -> {report['losses_pmap'][-1]:.5f}")
    print(f"jit + mesh:   loss {report['losses_jit'][0]:.5f} -> {report['losses_jit'][-1]:.5f}")
    ok = report["max_rel_diff"] < 1e-5 and report["losses_pmap"][-1] < report["losses_pmap"][0]
    print(
        f"pmap vs jit factors: max relative difference {report['max_rel_diff']:.2e} "
        f"(tolerance 1e-5); {'OK' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
