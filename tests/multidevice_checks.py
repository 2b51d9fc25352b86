"""Multi-device checks, run in a fresh process with 8 virtual CPU devices by the tests.

JAX fixes its device count when it starts, so tests that need a mesh run this script in a
subprocess and read back one JSON object of measured numbers; the assertions live in the tests.
Each JAX start costs seconds, so one invocation runs a whole group of checks::

    python tests/multidevice_checks.py sharding OUT.json
    python tests/multidevice_checks.py ckpt_save OUT.json CKPT_DIR
    python tests/multidevice_checks.py ckpt_resume OUT.json CKPT_DIR
    python tests/multidevice_checks.py ckpt_eval_shape OUT.json CKPT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import rplora_jax  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import pmap_data_parallel  # noqa: E402
import sharded_training  # noqa: E402

AUTO = (AxisType.Auto, AxisType.Auto)


def _rel(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))


def _pair(rng, shape_a, shape_b) -> dict:
    return {
        "lora_a": jnp.asarray(rng.standard_normal(shape_a), jnp.float32),
        "lora_b": jnp.asarray(rng.standard_normal(shape_b), jnp.float32),
    }


def _shard_map_case(mesh, params, grads, specs, axis_name) -> float:
    """Relative difference between the preconditioner in shard_map and unsharded."""
    precond = rplora_jax.riemannian_preconditioner(axis_name=axis_name)
    reference = rplora_jax.riemannian_preconditioner()
    expected = jax.jit(lambda g, p: reference.update(g, None, p)[0])(grads, params)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    p, g = jax.device_put(params, shardings), jax.device_put(grads, shardings)
    fn = jax.jit(
        jax.shard_map(
            lambda g, p: precond.update(g, None, p)[0],
            mesh=mesh,
            in_specs=(specs, specs),
            out_specs=specs,
        )
    )
    out = fn(g, p)
    return max(_rel(out[k], expected[k]) for k in out)


def check_shard_map() -> dict:
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=AUTO)
    rng = np.random.default_rng(0)
    res = {}
    # Both factors sharded on their feature axes over one mesh axis (FSDP-style).
    params, grads = _pair(rng, (16, 3), (3, 8)), _pair(rng, (16, 3), (3, 8))
    specs = {"lora_a": P("model", None), "lora_b": P(None, "model")}
    res["one_axis"] = _shard_map_case(mesh, params, grads, specs, "model")
    # Without the psum every device inverts a partial Gram: must be visibly wrong.
    res["one_axis_no_psum"] = _shard_map_case(mesh, params, grads, specs, None)
    # Over both mesh axes, and stacked layers (the stack axis is not sharded).
    params, grads = _pair(rng, (2, 16, 3), (2, 3, 8)), _pair(rng, (2, 16, 3), (2, 3, 8))
    both = ("data", "model")
    specs = {"lora_a": P(None, both, None), "lora_b": P(None, None, both)}
    res["two_axes_stacked"] = _shard_map_case(mesh, params, grads, specs, both)
    # Tensor-parallel layer: only `a` is sharded (row-parallel), `b` is replicated over `model`.
    params, grads = _pair(rng, (16, 3), (3, 8)), _pair(rng, (16, 3), (3, 8))
    specs = {"lora_a": P("model", None), "lora_b": P(None, None)}
    res["mixed_replicated_b"] = _shard_map_case(mesh, params, grads, specs, "model")
    return res


def _padded_spec(x) -> tuple:
    """x's PartitionSpec with trailing Nones to x.ndim (older jax drops them: P('x',))."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _update(g, q):
    return rplora_jax.riemannian_preconditioner().update(g, None, q)[0]


def _sharded_case(mesh, params, specs, fn=_update) -> dict:
    """``fn`` under jit on ``params`` placed by ``specs``: its relative error against the
    unsharded preconditioner and whether each output kept its input's spec, or the error."""
    expected = _update(params, params)
    p = jax.device_put(params, {k: NamedSharding(mesh, s) for k, s in specs.items()})
    try:
        with jax.set_mesh(mesh):
            out = jax.jit(fn)(p, p)
    except Exception as e:  # reported, asserted on by the test
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {
        "rel": max(_rel(out[k], expected[k]) for k in out),
        "kept": all(_padded_spec(out[k]) == _padded_spec(p[k]) for k in out),
    }


def check_explicit_mesh() -> dict:
    """The preconditioner under jit on a mesh with Explicit axes (jax.make_mesh's default)."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    params = _pair(np.random.default_rng(1), (16, 3), (3, 8))
    return _sharded_case(mesh, params, {"lora_a": P("data", None), "lora_b": P(None, "model")})


def check_mixed_meshes() -> dict:
    """Layouts beyond one axis type per mesh, case by case (see _sharded_case)."""
    rng = np.random.default_rng(3)
    explicit, explicit_auto = (AxisType.Explicit,) * 2, (AxisType.Explicit, AxisType.Auto)
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=explicit)
    # A shard_map manual over x only: inside it y stays an Explicit axis the factors use.
    partial = jax.shard_map(_update, mesh=mesh, in_specs=P(), out_specs=P(), axis_names={"x"})
    return {
        # One Explicit and one Auto axis, each sharding one factor's feature axis.
        "explicit_and_auto": _sharded_case(
            jax.make_mesh((2, 4), ("x", "y"), axis_types=explicit_auto),
            _pair(rng, (64, 4), (4, 32)),
            {"lora_a": P("x", None), "lora_b": P(None, "y")},
        ),
        "partial_shard_map": _sharded_case(
            mesh,
            _pair(rng, (64, 4), (4, 32)),
            {"lora_a": P("y", None), "lora_b": P(None, "y")},
            partial,
        ),
        # Stacked layers whose a and b shard the stacked axis differently (x for a, none for b).
        "stacked_unlike": _sharded_case(
            mesh,
            _pair(rng, (4, 64, 4), (4, 4, 32)),
            {"lora_a": P("x", None, None), "lora_b": P(None, None, "y")},
        ),
    }


def check_adapter_loading() -> dict:
    """Adapters loaded into sharded parameters: each factor's spec, and the values' error."""
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(2)
    params = {"q": {"kernel": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}}
    params["q"].update(_pair(rng, (16, 2), (2, 8)))
    specs = rplora_jax.lora_specs(
        params, {"q": {"kernel": P("data", "model"), "lora_a": None, "lora_b": None}}
    )
    placed = jax.device_put(params, rplora_jax.sharding.named_shardings(mesh, specs))
    res = {"want": {k: list(v.sharding.spec) for k, v in placed["q"].items()}}
    with tempfile.TemporaryDirectory() as d:
        rplora_jax.save_adapter(f"{d}/a.safetensors", placed)
        rplora_jax.save_peft_adapter(f"{d}/peft", placed, rplora_jax.LoRAConfig(rank=2))
        for name, loaded in (
            ("load_adapter", rplora_jax.load_adapter(f"{d}/a.safetensors", into=placed)),
            ("load_peft_adapter", rplora_jax.load_peft_adapter(f"{d}/peft", placed)),
        ):
            # A factor put on one device has no spec: its sharding's type is reported instead.
            res[name] = {
                k: list(getattr(v.sharding, "spec", [type(v.sharding).__name__]))
                for k, v in loaded["q"].items()
            }
            res[name + "_rel"] = max(_rel(loaded["q"][k], params["q"][k]) for k in params["q"])
    return res


def group_sharding() -> dict:
    report = sharded_training.run(steps=6, lr=1e-2, mesh_shape=(4, 2))
    return {
        "sharded": report,
        "pmap": pmap_data_parallel.run(steps=4, lr=1e-2),
        "shard_map": check_shard_map(),
        "explicit_mesh": check_explicit_mesh(),
        "adapters": check_adapter_loading(),
        "mixed_meshes": check_mixed_meshes(),
    }


# ---- checkpoint/resume -------------------------------------------------------------------------
N_STEPS, SAVE_AT = 6, 3


def _setup():
    st = sharded_training
    mesh = st.make_mesh((4, 2))
    params = st.init_params()
    lspecs, bspecs = st.split(st.param_specs(params))
    lora, base = st.split(params)
    lora_sh = rplora_jax.sharding.named_shardings(mesh, lspecs)
    lora = jax.device_put(lora, lora_sh)
    base = jax.device_put(base, rplora_jax.sharding.named_shardings(mesh, bspecs))
    tx = rplora_jax.scaled_adamw(1e-2)
    return mesh, lora, base, tx, NamedSharding(mesh, P("data", None))


def _train(lora, opt_state, base, tx, batch_sharding, steps):
    step_fn = sharded_training.make_train_step(tx)
    losses = []
    for step in steps:
        x, y = sharded_training.global_batch(step, batch_sharding)
        lora, opt_state, loss = step_fn(lora, opt_state, base, x, y)
        losses.append(float(loss))
    return lora, opt_state, losses


def _flat(tree) -> dict:
    return {
        jax.tree_util.keystr(k): np.asarray(v)
        for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def group_ckpt_save(directory: str) -> dict:
    """N steps straight, saving (asynchronously) after SAVE_AT; the straight result to an npz."""
    from script_loader import load_script

    TrainCheckpointer = load_script("examples/checkpointing.py").TrainCheckpointer

    _, lora, base, tx, bsh = _setup()
    opt_state = tx.init(lora)
    with TrainCheckpointer(directory, max_to_keep=2) as ckpt:
        lora, opt_state, losses = _train(lora, opt_state, base, tx, bsh, range(SAVE_AT))
        ckpt.save(SAVE_AT, lora, opt_state)
        # Training goes on (donating its buffers) while the save completes.
        lora, opt_state, more = _train(lora, opt_state, base, tx, bsh, range(SAVE_AT, N_STEPS))
    state = {"lora": _flat(lora), "opt_state": _flat(opt_state)}
    np.savez(
        os.path.join(directory, "straight.npz"),
        **{f"{part}{k}": v for part, d in state.items() for k, v in d.items()},
    )
    return {"losses": losses + more}


def group_ckpt_eval_shape(directory: str) -> dict:
    """Save a fresh optimizer state (optax's count on one device), restore it onto templates from
    ``jax.eval_shape`` and take a plain ``jax.jit`` step, on an Auto and an Explicit mesh (there
    ``eval_shape`` gives no sharding, here shardings on an abstract mesh)."""
    from script_loader import load_script

    TrainCheckpointer = load_script("examples/checkpointing.py").TrainCheckpointer
    tx = rplora_jax.scaled_adamw(1e-2)
    result = {}
    for kind in ("Auto", "Explicit"):
        mesh = jax.make_mesh((8,), ("data",), axis_types=(getattr(AxisType, kind),))
        lora = {
            "lora_a": jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("data", None))),
            "lora_b": jax.device_put(jnp.full((2, 4), 0.1), NamedSharding(mesh, P())),
        }
        sds = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        templates = jax.tree.map(sds, lora)
        with TrainCheckpointer(os.path.join(directory, kind)) as ckpt:
            ckpt.save(0, lora, tx.init(lora))
            ckpt.wait_until_finished()
            _, params, opt_state = ckpt.restore(templates, jax.eval_shape(tx.init, templates))
        update = jax.jit(lambda g, s, p: tx.update(g, s, p)[0])
        try:
            updates = update(jax.tree.map(jnp.ones_like, params), opt_state, params)
            error = None
        except ValueError as err:
            updates, error = None, str(err)[:200]
        result[kind] = {
            "error": error,
            "finite": updates is not None
            and all(bool(np.isfinite(np.asarray(u)).all()) for u in jax.tree.leaves(updates)),
            "n_devices_per_leaf": sorted(
                {len(x.sharding.device_set) for x in jax.tree.leaves((params, opt_state))}
            ),
        }
    return result


def group_ckpt_resume(directory: str) -> dict:
    """A new process: restore SAVE_AT onto fresh sharded templates and train to N."""
    from script_loader import load_script

    TrainCheckpointer = load_script("examples/checkpointing.py").TrainCheckpointer

    _, lora_tmpl, base, tx, bsh = _setup()
    opt_tmpl = tx.init(lora_tmpl)
    with TrainCheckpointer(directory) as ckpt:
        step, lora, opt_state = ckpt.restore(lora_tmpl, opt_tmpl)
    # Every factor and every Adam moment comes back on its template's mesh sharding.
    shardings_kept = all(
        isinstance(r.sharding, NamedSharding) and r.sharding.is_equivalent_to(t.sharding, r.ndim)
        for r, t in zip(
            jax.tree.leaves((lora, opt_state)), jax.tree.leaves((lora_tmpl, opt_tmpl)), strict=True
        )
        if isinstance(t.sharding, NamedSharding)
    )
    n_sharded = sum(
        isinstance(t.sharding, NamedSharding) and bool(t.sharding.spec)
        for t in jax.tree.leaves((lora_tmpl, opt_tmpl))
    )
    restored_specs = {
        k: str(v.sharding.spec)
        for k, v in (
            (jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(lora)[0]
        )
    }
    lora, opt_state, losses = _train(lora, opt_state, base, tx, bsh, range(step, N_STEPS))
    straight = np.load(os.path.join(directory, "straight.npz"))
    now = {"lora": _flat(lora), "opt_state": _flat(opt_state)}
    mismatched = [
        f"{part}{k}"
        for part, d in now.items()
        for k, v in d.items()
        if not np.array_equal(v, straight[f"{part}{k}"])
    ]
    max_abs = max(
        float(np.max(np.abs(v.astype(np.float64) - straight[f"{part}{k}"])))
        for part, d in now.items()
        for k, v in d.items()
    )
    return {
        "step": step,
        "shardings_kept": shardings_kept,
        "n_sharded_leaves": n_sharded,
        "restored_specs": restored_specs,
        "losses": losses,
        "n_compared": sum(len(d) for d in now.values()),
        "mismatched": mismatched,
        "max_abs_diff": max_abs,
    }


def main() -> None:
    group, out = sys.argv[1], sys.argv[2]
    if group == "sharding":
        result = group_sharding()
    elif group == "ckpt_save":
        result = group_ckpt_save(sys.argv[3])
    elif group == "ckpt_resume":
        result = group_ckpt_resume(sys.argv[3])
    elif group == "ckpt_eval_shape":
        result = group_ckpt_eval_shape(sys.argv[3])
    else:
        raise SystemExit(f"unknown group {group!r}")
    result["device_count"] = jax.device_count()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
