"""shard_map misuse checks, run in a fresh process with 8 virtual CPU devices.

Each case either reports how far the preconditioned gradient is from a float64 NumPy
computation on the full (unsharded) arrays, or the error it raised; tests/test_shard_map_checks.py
asserts on the JSON this writes::

    python tests/shard_map_checks.py OUT.json
"""

from __future__ import annotations

import contextlib
import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rplora_jax.preconditioner import DEFAULT_REG, riemannian_preconditioner  # noqa: E402

BOTH = ("data", "model")


def _pair(rng, shape_a, shape_b) -> dict:
    return {
        "lora_a": rng.standard_normal(shape_a).astype(np.float32),
        "lora_b": rng.standard_normal(shape_b).astype(np.float32),
    }


def _truth(params, grads) -> dict:
    """float64 preconditioned gradients of the full arrays, one layer at a time."""
    a, b = (np.asarray(params[k], np.float64) for k in ("lora_a", "lora_b"))
    ga, gb = (np.asarray(grads[k], np.float64) for k in ("lora_a", "lora_b"))
    eye = np.eye(a.shape[-1])
    inv_b = np.linalg.inv(b @ np.swapaxes(b, -1, -2) + DEFAULT_REG * eye)
    inv_a = np.linalg.inv(np.swapaxes(a, -1, -2) @ a + DEFAULT_REG * eye)
    return {"lora_a": ga @ inv_b, "lora_b": inv_a @ gb}


def _rel(out, truth) -> dict:
    return {
        k: float(np.max(np.abs(np.asarray(out[k], np.float64) - v)) / np.max(np.abs(v)))
        for k, v in truth.items()
    }


def _error(e: Exception) -> dict:
    return {"error": type(e).__name__, "message": str(e)}


def _shard_map(
    mesh, specs, axis_name, shapes=((16, 4), (4, 8)), seed=0, tx_specs=None, **kw
) -> dict:
    """``tx_specs``: the preconditioner's ``specs=`` (``"same"``: shard_map's in_specs)."""
    rng = np.random.default_rng(seed)
    params, grads = _pair(rng, *shapes), _pair(rng, *shapes)
    try:
        tx_specs = specs if tx_specs == "same" else tx_specs
        precond = riemannian_preconditioner(axis_name=axis_name, specs=tx_specs)
        fn = jax.jit(
            jax.shard_map(
                lambda g, p: precond.update(g, None, p)[0],
                mesh=mesh,
                in_specs=(specs, specs),
                out_specs=specs,
                **kw,
            )
        )
        shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
        out = fn(jax.device_put(grads, shardings), jax.device_put(params, shardings))
    except Exception as e:  # reported, asserted on by the test
        return _error(e)
    return _rel(out, _truth(params, grads))


def _jit(
    mesh,
    specs,
    axis_name=None,
    seed=0,
    tx_specs=None,
    shapes=((16, 4), (4, 8)),
    set_mesh=True,
) -> dict:
    """The preconditioner under jit on global arrays: error, and the gradients' shardings kept.
    ``set_mesh=False``: no ``jax.set_mesh`` around the call (the arrays carry their mesh)."""
    rng = np.random.default_rng(seed)
    params, grads = _pair(rng, *shapes), _pair(rng, *shapes)
    shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
    p, g = jax.device_put(params, shardings), jax.device_put(grads, shardings)
    try:
        precond = riemannian_preconditioner(axis_name=axis_name, specs=tx_specs)
        with jax.set_mesh(mesh) if set_mesh else contextlib.nullcontext():
            out = jax.jit(lambda g, p: precond.update(g, None, p)[0])(g, p)
    except Exception as e:  # reported, asserted on by the test
        return _error(e)
    res = _rel(out, _truth(params, grads))
    res["kept_sharding"] = {
        k: v.sharding.is_equivalent_to(g[k].sharding, v.ndim) for k, v in out.items()
    }
    res["specs"] = {k: str(v.sharding.spec) for k, v in out.items()}
    return res


def _pmap(axis_name) -> dict:
    """pmap does not track varying axes either: a factor's sharding cannot be read there."""
    rng = np.random.default_rng(0)
    n = jax.device_count()
    params = _pair(rng, (n, 16, 4), (n, 4, 8))
    try:
        precond = riemannian_preconditioner(axis_name=axis_name)
        out = jax.pmap(lambda g, p: precond.update(g, None, p)[0], axis_name="i")(params, params)
    except Exception as e:  # reported, asserted on by the test
        return _error(e)
    return _rel(out, _truth(params, params))


def main() -> None:
    auto = jax.make_mesh((4, 2), BOTH, axis_types=(AxisType.Auto,) * 2)
    explicit = jax.make_mesh((4, 2), BOTH, axis_types=(AxisType.Explicit,) * 2)
    fsdp = {"lora_a": P("model", None), "lora_b": P(None, "model")}
    fsdp2 = {"lora_a": P(BOTH, None), "lora_b": P(None, BOTH)}
    rank = {"lora_a": P(None, "model"), "lora_b": P("model", None)}
    res = {
        # Controls: right before and after.
        "fsdp": _shard_map(auto, fsdp, "model"),
        "replicated_named": _shard_map(auto, {"lora_a": P(), "lora_b": P()}, "model"),
        # check_vma=False: shard_map stops tracking which axes a value varies along.
        "fsdp_check_vma_false": _shard_map(auto, fsdp, "model", check_vma=False),
        # Names that are not axes of the mesh.
        "axis_foo": _shard_map(auto, fsdp, "foo"),
        "axis_typo": _shard_map(auto, fsdp2, ("data", "modle")),
        # Not a manual axis: the shard_map maps over 'model' only.
        "axis_not_manual": _shard_map(
            auto, fsdp, ("data", "model"), axis_names=frozenset({"model"})
        ),
        # Under jit (no shard_map) axis_name must not be given.
        "jit_with_axis_name": _jit(auto, fsdp, "model"),
        # The rank axis sharded: in shard_map the local blocks look like an FSDP pair.
        "rank_shard_map": _shard_map(auto, rank, "model"),
        "rank_jit_auto": _jit(auto, rank),
        "rank_jit_explicit": _jit(explicit, rank),
        "fsdp_jit_auto": _jit(auto, {"lora_a": P("data", None), "lora_b": P(None, "model")}),
        # A stacked-layer axis sharded over a named axis.
        "stacked_shard_map": _shard_map(
            auto,
            {"lora_a": P("model", None, None), "lora_b": P("model", None, None)},
            "model",
            shapes=((4, 16, 4), (4, 4, 8)),
        ),
    }
    stacked = {"lora_a": P("model", None, None), "lora_b": P("model", None, None)}
    stacked_shapes = ((4, 16, 4), (4, 4, 8))
    res.update(
        {
            # specs= instead of axis_name: each factor's sharded axes are known.
            "fsdp_specs": _shard_map(auto, fsdp, None, tx_specs="same"),
            "fsdp2_specs": _shard_map(auto, fsdp2, None, tx_specs="same"),
            "row_parallel_specs": _shard_map(
                auto, {"lora_a": P("model", None), "lora_b": P()}, None, tx_specs="same"
            ),
            "fsdp_specs_check_vma_false": _shard_map(
                auto, fsdp, None, tx_specs="same", check_vma=False
            ),
            "stacked_specs": _shard_map(
                auto, stacked, None, shapes=stacked_shapes, tx_specs="same"
            ),
            "stacked_and_fsdp_specs": _shard_map(
                auto,
                {"lora_a": P("data", "model", None), "lora_b": P("data", None, "model")},
                None,
                shapes=stacked_shapes,
                tx_specs="same",
            ),
            "replicated_prefix_specs": _shard_map(
                auto, {"lora_a": P(), "lora_b": P()}, None, tx_specs=P()
            ),
            "rank_specs": _shard_map(auto, rank, None, tx_specs="same"),
            "specs_not_in_specs": _shard_map(
                auto, {"lora_a": P(), "lora_b": P()}, None, tx_specs=fsdp
            ),
            "specs_unknown_axis": _shard_map(
                auto, fsdp, None, tx_specs={"lora_a": P("modle", None), "lora_b": P()}
            ),
            "specs_wrong_tree": _shard_map(auto, fsdp, None, tx_specs={"lora_a": P()}),
            "specs_jit": _jit(auto, fsdp, tx_specs=fsdp),
            # Explicit mesh axes (jax.make_mesh's default): stacked layers sharded, and no
            # jax.set_mesh around the call.
            "stacked_jit_explicit": _jit(explicit, stacked, shapes=stacked_shapes),
            "stacked_jit_explicit_no_set_mesh": _jit(
                explicit, stacked, shapes=stacked_shapes, set_mesh=False
            ),
            "fsdp_jit_explicit_no_set_mesh": _jit(explicit, fsdp, set_mesh=False),
        }
    )
    try:
        riemannian_preconditioner(axis_name="model", specs=fsdp)
        res["specs_and_axis_name"] = {"constructed": True}
    except Exception as e:  # reported, asserted on by the test
        res["specs_and_axis_name"] = _error(e)
    res["pmap_axis_name"] = _pmap("i")
    try:
        riemannian_preconditioner(axis_name=0)
        res["axis_int"] = {"constructed": True}
    except Exception as e:  # reported, asserted on by the test
        res["axis_int"] = _error(e)
    res["device_count"] = jax.device_count()
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
