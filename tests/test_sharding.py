"""Sharding: factor specs from kernel specs, sharded jit == one device, shard_map, pmap.

The multi-device checks run once, in a subprocess with 8 virtual CPU devices
(tests/multidevice_checks.py); the tests here assert on the numbers it reports.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from multidevice import run_multidevice

import rplora_jax
from rplora_jax.sharding import lora_factor_specs, lora_specs, named_shardings

HERE = Path(__file__).resolve().parent

# float32 on CPU; the sharded run sums the Grams and gradients in another order than one device.
SHARDED_RTOL = 1e-5


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    result = run_multidevice("sharding", tmp_path_factory.mktemp("sharding"))
    assert result["device_count"] == 8
    return result


# ---- specs (in process) ------------------------------------------------------------------------
def test_factor_specs_flax_layout():
    a, b = lora_factor_specs(P("data", "model"), a_ndim=2, b_ndim=2)
    assert (tuple(a), tuple(b)) == (("data", None), (None, "model"))
    # Trailing axes left out of the kernel spec are replicated.
    a, b = lora_factor_specs(P("data"), a_ndim=2, b_ndim=2)
    assert (tuple(a), tuple(b)) == (("data", None), (None, None))


def test_factor_specs_stacked_and_multi_axis():
    # Stacked layers (L, heads, head_dim, d_model): stack axis kept on both factors.
    spec = P("pipe", "model", None, "data")
    a, b = lora_factor_specs(spec, a_ndim=4, b_ndim=3, stacked=1)
    assert tuple(a) == ("pipe", "model", None, None)
    assert tuple(b) == ("pipe", None, "data")


def test_factor_specs_torch_layout():
    # PyTorch weight (out, in); A: (r, in), B: (out, r).
    a, b = lora_factor_specs(P("model", "data"), a_ndim=2, b_ndim=2, layout="torch")
    assert (tuple(a), tuple(b)) == ((None, "data"), ("model", None))


def test_factor_specs_errors():
    with pytest.raises(ValueError, match="has 3 entries but the kernel has only 2"):
        lora_factor_specs(P("a", "b", "c"), a_ndim=2, b_ndim=2)
    with pytest.raises(ValueError, match="layout must be"):
        lora_factor_specs(P(), a_ndim=2, b_ndim=2, layout="jax")


def _layer(d_in, d_out, r=2):
    return {
        "kernel": jnp.zeros((d_in, d_out)),
        "lora_a": jnp.zeros((d_in, r)),
        "lora_b": jnp.zeros((r, d_out)),
    }


def test_lora_specs_finds_kernels_by_convention():
    params = {
        "mine": _layer(8, 16),
        # nnx.LoRALinear keeps its factors under `lora`.
        "nnx": {"kernel": jnp.zeros((8, 4)), "lora": _layer(8, 4) | {"kernel": None}},
        # qwix: `<w>_lora_a` next to `<w>`.
        "qwix": {
            "w": jnp.zeros((4, 8)),
            "w_lora_a": jnp.zeros((4, 2)),
            "w_lora_b": jnp.zeros((2, 8)),
        },
        # gemma: `lora/a`, `lora/b` next to `w`.
        "gemma": {"w": jnp.zeros((6, 8)), "lora": {"a": jnp.zeros((6, 2)), "b": jnp.zeros((2, 8))}},
    }
    del params["nnx"]["lora"]["kernel"]
    given = jax.tree.map(lambda _: None, params)
    given["mine"]["kernel"] = P("data", "model")
    given["nnx"]["kernel"] = P(None, "model")
    given["qwix"]["w"] = P("model", None)
    given["gemma"]["w"] = P("data", "model")
    specs = lora_specs(params, given)
    got = jax.tree.map(tuple, specs, is_leaf=lambda s: isinstance(s, P))
    assert got["mine"] == {
        "kernel": ("data", "model"),
        "lora_a": ("data", None),
        "lora_b": (None, "model"),
    }
    assert got["nnx"]["lora"] == {"lora_a": (None, None), "lora_b": (None, "model")}
    assert got["qwix"]["w_lora_a"] == ("model", None)
    assert got["qwix"]["w_lora_b"] == (None, None)
    assert got["gemma"]["lora"] == {"a": ("data", None), "b": (None, "model")}


def test_lora_specs_peft_torch_layout():
    params = {
        "q_proj": {
            "base_layer": {"weight": jnp.zeros((16, 8))},
            "lora_A": {"weight": jnp.zeros((2, 8))},
            "lora_B": {"weight": jnp.zeros((16, 2))},
        }
    }
    given = {
        "q_proj": {
            "base_layer": {"weight": P("model", "data")},
            "lora_A": {"weight": None},
            "lora_B": {"weight": None},
        }
    }
    specs = lora_specs(params, given, rules=rplora_jax.PEFT)
    assert tuple(specs["q_proj"]["lora_A"]["weight"]) == (None, "data")
    assert tuple(specs["q_proj"]["lora_B"]["weight"]) == ("model", None)


def test_lora_specs_errors_name_the_paths():
    params = {"q": {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 16))}}
    given = jax.tree.map(lambda _: None, params)
    with pytest.raises(ValueError, match="No base kernel found for the LoRA pair a='q/lora_a'"):
        lora_specs(params, given)
    params = {"q": _layer(8, 16) | {"kernel": jnp.zeros((8, 15))}}
    given = jax.tree.map(lambda _: None, params)
    with pytest.raises(ValueError, match=r"Kernel 'q/kernel' has shape \(8, 15\).*\(8, 16\)"):
        lora_specs(params, given)
    with pytest.raises(ValueError, match="param_specs has 1 leaves but params has 3"):
        lora_specs(params, {"q": P()})
    params = {"q": _layer(8, 16)}
    given = {"q": {"kernel": P("a", "b", "c"), "lora_a": None, "lora_b": None}}
    with pytest.raises(ValueError, match="of kernel 'q/kernel' has 3 entries"):
        lora_specs(params, given)


def test_lora_specs_matches_specs_by_path_not_position():
    # Same leaf count, misnamed key: v/kernel used to get the spec written under 'typo'.
    params = {"q": _layer(8, 16), "v": {"kernel": jnp.zeros((16, 8))}}
    given = {
        "q": {"kernel": P("data", "model"), "lora_a": None},
        "v": {"kernel": None, "typo": P("model")},
    }
    with pytest.raises(
        ValueError, match=r"no spec for \['q/lora_b'\], specs for non-parameters \['v/typo'\]"
    ):
        lora_specs(params, given)


def test_lora_specs_skips_absent_parameters():
    # A None bias is no parameter; a spec tree mapped over params keeps it (or gives it a spec).
    params = {"q": {**_layer(8, 16), "bias": None}}
    for bias_spec in (None, P()):
        given = {"q": {"kernel": P("data", "model"), "lora_a": P(), "lora_b": P(),
                       "bias": bias_spec}}  # fmt: skip
        out = lora_specs(params, given)["q"]
        assert (out["lora_a"], out["lora_b"]) == (P("data", None), P(None, "model"))


def test_specs_from_an_nnx_state_work_as_specs():
    # Specs filtered from an nnx.State keep their nnx.Variable wrappers; inside shard_map they
    # must act exactly like the plain spec tree, and a wrong one must still be caught.
    from flax import nnx

    model = nnx.Sequential(nnx.LoRALinear(8, 16, lora_rank=2, rngs=nnx.Rngs(0)))
    model.layers[0].lora.lora_b[...] = jnp.ones((2, 16)) * 0.3
    state = nnx.state(model, nnx.Param)
    given = jax.tree.map(lambda _: P(), state)
    given["layers"][0]["kernel"] = nnx.Param(P("data", None))
    wrapped = nnx.filter_state(lora_specs(state, given), nnx.LoRAParam)
    plain = nnx.to_pure_dict(wrapped)
    params = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    grads = jax.tree.map(jnp.ones_like, params)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

    def run(specs, in_specs):
        tx = rplora_jax.riemannian_preconditioner(specs=specs)
        update = lambda g, p: tx.update(g, tx.init(p), p)[0]
        sharded = jax.shard_map(
            update, mesh=mesh, in_specs=(in_specs, in_specs), out_specs=in_specs
        )
        return jax.jit(sharded)(grads, params)

    expected = run(plain, plain)
    assert plain["layers"][0]["lora"]["lora_a"] == P("data", None)
    got = run(wrapped, plain)
    jax.tree.map(
        lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), got, expected
    )
    wrong = jax.tree.map(lambda x: x, plain)
    wrong["layers"][0]["lora"]["lora_b"] = P(None, "data")  # claims a split that is not there
    with pytest.raises(ValueError, match="lora_b"):
        run(wrong, plain)


def test_lora_specs_explicit_kernel_path():
    params = {
        "base": jnp.zeros((8, 16)),
        "adapter": {"lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 16))},
    }
    given = {"base": P(None, "model"), "adapter": {"lora_a": None, "lora_b": None}}
    specs = lora_specs(params, given, kernel_path={"adapter/lora_a": "base"})
    assert tuple(specs["adapter"]["lora_b"]) == (None, "model")
    specs = lora_specs(params, given, kernel_path=lambda pair: "base")
    assert tuple(specs["adapter"]["lora_a"]) == (None, None)


def test_named_shardings_binds_specs():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    shardings = named_shardings(mesh, {"w": P("data"), "b": None})
    assert shardings["w"].spec == P("data") and shardings["b"].spec == P()
    assert shardings["w"].mesh is mesh


# ---- 8 devices (subprocess) --------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_jit_equals_single_device(report):
    sharded = report["sharded"]
    assert sharded["mesh"] == {"data": 4, "model": 2}
    assert sharded["max_rel_diff"] < SHARDED_RTOL
    assert sharded["max_loss_diff"] < 1e-6
    assert sharded["losses"][-1] < sharded["losses"][0]


@pytest.mark.slow
def test_factor_specs_follow_kernels(report):
    specs = report["sharded"]["specs"]
    assert specs["layer1"] == {"lora_a": "P('data', None)", "lora_b": "P(None, 'model')"}
    assert specs["layer2"] == {"lora_a": "P('model', None)", "lora_b": "P(None, 'data')"}


@pytest.mark.slow
def test_preconditioned_gradients_keep_their_sharding(report):
    per_leaf = report["sharded"]["precond_sharding"]
    assert len(per_leaf) == 4
    assert all(same for _, same in per_leaf.values()), per_leaf


@pytest.mark.slow
def test_pmap_example_matches_jit(report):
    pmap = report["pmap"]
    assert pmap["devices"] == 8
    assert pmap["max_rel_diff"] < SHARDED_RTOL
    assert pmap["losses_pmap"][-1] < pmap["losses_pmap"][0]


@pytest.mark.slow
def test_loaded_adapters_keep_the_parameters_shardings(report):
    # Loading into sharded parameters put every factor on one device (load_adapter and
    # load_peft_adapter alike); now each comes back with its target's sharding, values intact.
    res = report["adapters"]
    assert res["want"] == {
        "kernel": ["data", "model"],
        "lora_a": ["data", None],
        "lora_b": [None, "model"],
    }
    for name in ("load_adapter", "load_peft_adapter"):
        assert res[name] == res["want"], name
        assert res[name + "_rel"] < 1e-6, name


@pytest.mark.parametrize("case", ["explicit_and_auto", "partial_shard_map", "stacked_unlike"])
def test_meshes_mixing_axis_types_and_unlike_factor_layouts(report, case):
    # Each raised a ShardingTypeError: Explicit axes were only recognised when every mesh axis
    # was Explicit, and a and b Grams sharded unlike each other could not be concatenated.
    res = report["mixed_meshes"][case]
    assert "error" not in res, res.get("error")
    assert res["rel"] < SHARDED_RTOL
    assert res["kept"]


def test_shard_map_axis_name_equals_unsharded(report):
    res = report["shard_map"]
    assert res["one_axis"] < SHARDED_RTOL
    assert res["two_axes_stacked"] < SHARDED_RTOL
    # Without axis_name each device inverts its partial Gram: the psum is what makes it right.
    assert res["one_axis_no_psum"] > 0.1


@pytest.mark.slow
def test_shard_map_axis_name_with_a_replicated_factor(report):
    assert report["shard_map"]["mixed_replicated_b"] < SHARDED_RTOL


@pytest.mark.slow
def test_preconditioner_under_explicit_mesh(report):
    res = report["explicit_mesh"]
    assert "error" not in res, res.get("error")
    assert res["rel"] < SHARDED_RTOL
    assert res["kept"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_matches_one_process(report):
    """The multi-host path: jax.distributed.initialize, 2 processes x 4 CPU devices, each
    loading only its own rows of every batch, reproduce the 8-device single-process losses."""
    steps, port = 3, _free_port()
    cmd = [
        sys.executable,
        str(HERE.parent / "examples" / "sharded_training.py"),
        "--distributed",
        "--coordinator",
        f"localhost:{port}",
        "--num-processes",
        "2",
        "--cpu-devices",
        "4",
        "--steps",
        str(steps),
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    stdout = outs[0][0]
    assert "2 process(es), mesh {'data': 4, 'model': 2}" in stdout
    assert "DIFFERS" not in stdout
    found = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+) in 3 steps", stdout)
    assert found, stdout
    losses = report["sharded"]["losses"]
    assert float(found.group(1)) == pytest.approx(losses[0], abs=1e-5)
    assert float(found.group(2)) == pytest.approx(losses[steps - 1], abs=1e-5)
