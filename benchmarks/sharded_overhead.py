"""Cost of the preconditioner in a sharded train step: scaled_adamw vs optax.adamw.

A LoRA MLP (frozen kernels plus factors, sharded FSDP/tensor-parallel over a ``('data', 'model')``
mesh as in examples/sharded_training.py) is trained with each optimizer; the whole jitted step
(forward, backward, preconditioner, Adam, apply) is timed. Medians of repeated steps after warm-up
(the two optimizers alternating step by step) are printed with their ratio, measured in this run.
On CPU the devices are virtual (8 by default) and share the host's cores, so the ratio, not the
absolute time, is the number to read.

    python benchmarks/sharded_overhead.py [--repeats 30] [--layers 8] [--width 512] [--rank 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--mesh", default="4,2", help="data,model axis sizes")
    parser.add_argument("--cpu-devices", type=int, default=8)
    return parser.parse_args(argv)


import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rplora_jax  # noqa: E402
from rplora_jax.sharding import lora_specs, named_shardings  # noqa: E402


def init(layers: int, width: int, rank: int) -> tuple[dict, dict]:
    keys = jax.random.split(jax.random.key(0), 3 * layers)
    params = {
        f"layer{i}": {
            "kernel": jax.random.normal(keys[3 * i], (width, width)) / width**0.5,
            "lora_a": jax.random.normal(keys[3 * i + 1], (width, rank)) / width**0.5,
            "lora_b": jax.random.normal(keys[3 * i + 2], (rank, width)) * 0.01,
        }
        for i in range(layers)
    }
    # Alternate column- and row-parallel layers, FSDP over `data` on the other axis.
    given = {
        name: {
            "kernel": P("data", "model") if i % 2 == 0 else P("model", "data"),
            "lora_a": None,
            "lora_b": None,
        }
        for i, name in enumerate(params)
    }
    return params, lora_specs(params, given)


def split(tree: dict) -> tuple[dict, dict]:
    lora = {k: {n: v[n] for n in ("lora_a", "lora_b")} for k, v in tree.items()}
    return lora, {k: {"kernel": v["kernel"]} for k, v in tree.items()}


def loss_fn(lora: dict, base: dict, x: jax.Array) -> jax.Array:
    h = x
    for name, ab in lora.items():
        h = jax.nn.gelu(h @ base[name]["kernel"] + (h @ ab["lora_a"]) @ ab["lora_b"])
    return jnp.mean(h**2)


class Runner:
    """One optimizer's jitted train step and its running state."""

    def __init__(self, tx: optax.GradientTransformation, lora: dict, base: dict, x: jax.Array):
        def step(lora, opt_state, base, x):
            grads = jax.grad(loss_fn)(lora, base, x)
            updates, opt_state = tx.update(grads, opt_state, lora)
            return optax.apply_updates(lora, updates), opt_state

        self.step = jax.jit(step, donate_argnums=(0, 1))
        self.lora = jax.tree.map(jnp.copy, lora)
        self.opt_state = tx.init(self.lora)
        self.base, self.x = base, x

    def __call__(self) -> float:
        start = time.perf_counter()
        self.lora, self.opt_state = self.step(self.lora, self.opt_state, self.base, self.x)
        jax.block_until_ready(self.lora)
        return time.perf_counter() - start


def time_both(runners: dict, warmup: int, repeats: int) -> dict:
    """Medians; the optimizers alternate step by step so load changes hit both alike."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    auto = jax.sharding.AxisType.Auto
    shape = tuple(int(n) for n in args.mesh.split(","))
    if shape[0] * shape[1] != jax.device_count():
        raise SystemExit(
            f"--mesh {args.mesh} needs {shape[0] * shape[1]} devices, this host has "
            f"{jax.device_count()}: pass --mesh data,model with that product (e.g. --mesh "
            f"{jax.device_count()},1)."
        )
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(auto, auto))
    params, specs = init(args.layers, args.width, args.rank)
    lora, base = split(jax.device_put(params, named_shardings(mesh, specs)))
    x = jax.device_put(
        jax.random.normal(jax.random.key(1), (args.batch, args.width)),
        NamedSharding(mesh, P("data", None)),
    )
    print(
        f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices, mesh "
        f"{dict(mesh.shape)}; {args.layers} layers {args.width}x{args.width}, rank {args.rank}, "
        f"batch {args.batch}; median of {args.repeats} steps after {args.warmup} warm-up"
    )
    runners = {
        "adamw": Runner(optax.adamw(1e-3), lora, base, x),
        "scaled_adamw": Runner(rplora_jax.scaled_adamw(1e-3), lora, base, x),
    }
    medians = time_both(runners, args.warmup, args.repeats)
    adamw, scaled = medians["adamw"], medians["scaled_adamw"]
    print(f"  adamw        {adamw * 1e3:8.2f} ms/step")
    print(f"  scaled_adamw {scaled * 1e3:8.2f} ms/step")
    print(f"  ratio scaled_adamw / adamw: {scaled / adamw:.2f}x")


if __name__ == "__main__":
    main()
