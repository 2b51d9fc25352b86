"""The LoRA optimizers (LoRA-RITE, RefLoRA, scaled AdamW) on 8 virtual CPU devices, against the
same steps on one device.

Each case runs three updates from the same start, sharded (inside ``shard_map`` with
``axis_name`` or ``specs``, or under ``jax.jit`` on sharded global arrays) and unsharded, and
reports the largest relative difference of the factors, or the error raised;
tests/test_lora_rite.py and tests/test_reflora.py assert on the JSON this writes::

    python tests/successor_checks.py OUT.json
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rplora_jax  # noqa: E402

OPTIMIZERS = {
    # clipped at a small norm so that the global norm, summed across devices, matters
    "lora_rite": lambda **kw: rplora_jax.lora_rite(1e-2, clip_unmagnified_grad=0.05, **kw),
    "reflora": lambda **kw: rplora_jax.reflora_adamw(1e-2, **kw),
    "scaled_adamw": lambda **kw: rplora_jax.scaled_adamw(1e-2, **kw),
}
LAYOUTS = {
    # name: (a shape, b shape, a spec, b spec): features split over "model"; stacked layers
    # split over "data"
    "features": ((16, 4), (4, 8), P("model", None), P(None, "model")),
    "stacked": ((4, 16, 4), (4, 4, 8), P("data", "model", None), P("data", None, "model")),
    # einsum LoRA: a has two feature axes, the minor one split
    "einsum": ((16, 4, 2), (2, 8), P(None, "model", None), P(None, "model")),
}


def two_pairs(layout):
    """Two pairs of one kind (one batched Gram dot for the chunk, below 4096 elements)."""
    params, grads = start(layout)
    twice = lambda t: {"p0": t, "p1": jax.tree.map(lambda x: 0.5 * x, t)}
    return twice(params), [twice(g) for g in grads]


def start(layout, seed=0):
    a_shape, b_shape, _, _ = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    params = {
        "lora_a": rng.standard_normal(a_shape).astype(np.float32) / 4,
        "lora_b": rng.standard_normal(b_shape).astype(np.float32) / 4,
    }
    grads = [
        {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
        for _ in range(3)
    ]
    return params, grads


def steps(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def rel(got, want) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - y)) / np.max(np.abs(y)))
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    )


def shard_map_case(name, layout, how):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    params, grads = start(layout)
    want = jax.jit(lambda p, g: steps(OPTIMIZERS[name](), p, g))(params, grads)
    specs = dict(zip(("lora_a", "lora_b"), LAYOUTS[layout][2:], strict=True))
    kw = {"axis_name": "model"} if how == "axis_name" else {"specs": specs}
    fn = jax.jit(
        jax.shard_map(
            lambda p, g: steps(OPTIMIZERS[name](**kw), p, g),
            mesh=mesh,
            in_specs=(specs, [specs] * 3),
            out_specs=specs,
        )
    )
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    got = fn(jax.device_put(params, shardings), [jax.device_put(g, shardings) for g in grads])
    return {"rel": rel(got, want)}


def jit_case(name, axis_type=AxisType.Auto, layout="features"):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
    params, grads = two_pairs(layout)
    want = jax.jit(lambda p, g: steps(OPTIMIZERS[name](), p, g))(params, grads)
    a_spec, b_spec = LAYOUTS[layout][2:]
    one = {"lora_a": NamedSharding(mesh, a_spec), "lora_b": NamedSharding(mesh, b_spec)}
    shardings = {"p0": one, "p1": one}
    tx = OPTIMIZERS[name]()
    put = lambda t: jax.device_put(t, shardings)
    update = jax.jit(tx.update)
    p, state = put(params), jax.jit(tx.init)(put(params))
    for g in grads:
        updates, state = update(put(g), state, p)
        p = optax.apply_updates(p, updates)
    kept = all(
        x.sharding.is_equivalent_to(s, x.ndim)
        for x, s in zip(jax.tree.leaves(updates), jax.tree.leaves(shardings), strict=True)
    )
    # The state: arrays shaped like a factor sharded like it; r x r blocks replicated, or for
    # stacked layers on Explicit axes, split over the layers like the factors.
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True)
    by_shape = {x.shape: s for x, s in pairs}
    layers = axis_type == AxisType.Explicit and layout == "stacked"

    def right(x):
        if x.shape in by_shape:
            return x.sharding.is_equivalent_to(by_shape[x.shape], x.ndim)
        split = tuple(x.sharding.spec) in (("data",), ("data", None, None))
        if layers:
            return split
        # Under Auto axes XLA may split stacked layers' blocks like their factors, or not.
        return x.sharding.is_fully_replicated or (layout == "stacked" and split)

    leaves = [x for x in jax.tree.leaves(state) if x.ndim]
    return {"rel": rel(p, want), "kept": kept and all(map(right, leaves)) and bool(leaves)}


def main(out: str) -> None:
    report = {}
    for name in OPTIMIZERS:
        for layout in LAYOUTS:
            for how in ("axis_name", "specs"):
                if layout == "stacked" and how == "axis_name":
                    continue  # axis_name cannot tell a split layer axis from a feature axis
                key = f"{name}/{layout}/{how}"
                try:
                    report[key] = shard_map_case(name, layout, how)
                except Exception as e:  # reported, asserted on by the tests
                    report[key] = {"error": f"{type(e).__name__}: {e}"}
        for key, axis_type, layout in (
            ("jit", AxisType.Auto, "features"),
            ("jit-explicit", AxisType.Explicit, "features"),
            ("jit-stacked", AxisType.Auto, "stacked"),
            ("jit-explicit-stacked", AxisType.Explicit, "stacked"),
            ("jit-explicit-einsum", AxisType.Explicit, "einsum"),
        ):
            try:
                with jax.set_mesh(
                    jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
                ):
                    report[f"{name}/{key}"] = jit_case(name, axis_type, layout)
            except Exception as e:
                report[f"{name}/{key}"] = {"error": f"{type(e).__name__}: {e}"}
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
