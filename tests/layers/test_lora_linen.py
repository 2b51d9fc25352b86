"""Linen LoRA layers: drop-in compatibility, the LoRA term, options, stacking and pairing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import rplora_jax
from rplora_jax import LoRAConfig
from rplora_jax.layers.lora_linen import LoRADense, LoRADenseGeneral, LoRAEinsum

X = jax.random.normal(jax.random.key(1), (2, 3, 6))


def init(module, *args, **kwargs):
    # One compiled call instead of dozens of eagerly compiled ops keeps the suite fast.
    return jax.jit(functools.partial(module.init, **kwargs))(jax.random.key(0), *args)


def apply(module, variables, *args, **kwargs):
    return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


CASES = {
    "dense": (nn.Dense(4), LoRADense(4, lora=LoRAConfig(rank=2))),
    "dense_general": (
        nn.DenseGeneral((2, 3), axis=(-2, -1)),
        LoRADenseGeneral((2, 3), axis=(-2, -1), lora=LoRAConfig(rank=2)),
    ),
    "einsum": (
        nn.Einsum((6, 2, 4), "btd,dnh->btnh"),
        LoRAEinsum((6, 2, 4), "btd,dnh->btnh", lora=LoRAConfig(rank=2)),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_drop_in_same_params_and_outputs(name):
    base, lora = CASES[name]
    vb = init(base, X)
    vl = init(lora, X)
    pb, pl = vb["params"], vl["params"]
    assert set(pl) == {*pb, "lora_a", "lora_b"}
    for k in pb:  # same names, shapes and (same key) values as the base layer
        np.testing.assert_array_equal(pb[k], pl[k])
    # Pretrained base weights load unchanged; b = 0 gives the base output bit for bit.
    loaded = {"params": {**pl, **pb}}
    np.testing.assert_array_equal(apply(lora, loaded, X), apply(base, vb, X))
    assert not np.any(np.asarray(pl["lora_b"]))
    (pair,) = rplora_jax.find_lora_pairs(vl)
    assert (pair.a_path, pair.b_path, pair.rank, pair.stacked_shape) == (
        "params/lora_a",
        "params/lora_b",
        2,
        (),
    )


@pytest.mark.parametrize("rslora,expected", [(False, 16.0 / 4), (True, 16.0 / 2)])
def test_dense_lora_term_and_scale(rslora, expected):
    layer = LoRADense(5, lora=LoRAConfig(rank=4, alpha=16.0, rslora=rslora))
    assert layer.lora.scale == expected
    params = init(layer, X)["params"]
    params["lora_b"] = jax.random.normal(jax.random.key(2), (4, 5))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(X, np.float64)
    want = x @ p["kernel"] + p["bias"] + expected * (x @ p["lora_a"]) @ p["lora_b"]
    got = apply(layer, {"params": params}, X)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_lora_term_matches_merged_kernel():
    layer = LoRAEinsum(
        (6, 2, 4), "btd,dnh->btnh", use_bias=False, lora=LoRAConfig(rank=3, alpha=6.0)
    )
    params = init(layer, X)["params"]
    params["lora_b"] = jax.random.normal(jax.random.key(2), (3, 2, 4))
    merged = params["kernel"] + 2.0 * jnp.einsum("dr,rnh->dnh", params["lora_a"], params["lora_b"])
    want = jnp.einsum("btd,dnh->btnh", X, merged)
    np.testing.assert_allclose(apply(layer, {"params": params}, X), want, rtol=1e-5, atol=1e-5)


def test_einsum_shared_axes_are_stacked_pairs():
    layer = LoRAEinsum((3, 6, 5), "ebd,edf->ebf", lora=LoRAConfig(rank=2))
    x = jax.random.normal(jax.random.key(0), (3, 4, 6))
    params = init(layer, x)["params"]
    assert params["lora_a"].shape == (3, 6, 2) and params["lora_b"].shape == (3, 2, 5)
    (pair,) = rplora_jax.find_lora_pairs(params)
    assert pair.stacked_shape == (3,)
    params["lora_b"] = jax.random.normal(jax.random.key(1), (3, 2, 5))
    merged = params["kernel"] + jnp.einsum("edr,erf->edf", params["lora_a"], params["lora_b"])
    want = jnp.einsum("ebd,edf->ebf", x, merged) + params["bias"][:, None, :]
    np.testing.assert_allclose(apply(layer, {"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_einsum_kernel_order_error_names_the_layer():
    layer = LoRAEinsum((2, 6, 4), "btd,ndh->btnh", lora=LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"LoRAEinsum.*\[shared\]\[contracted\]\[output\]"):
        init(layer, X)


def test_dropout_only_on_lora_path():
    layer = LoRADense(5, lora=LoRAConfig(rank=2, dropout_rate=0.5))
    params = init(layer, X, deterministic=True)["params"]
    rngs = {"dropout": jax.random.key(3)}
    base = apply(layer, {"params": params}, X, deterministic=True)
    # With b = 0 dropout cannot change the output: it only touches the LoRA path.
    np.testing.assert_array_equal(
        apply(layer, {"params": params}, X, deterministic=False, rngs=rngs), base
    )
    params["lora_b"] = jnp.ones((2, 5))
    det = apply(layer, {"params": params}, X, deterministic=True)
    drop = apply(layer, {"params": params}, X, deterministic=False, rngs=rngs)
    assert float(jnp.abs(det - drop).max()) > 1e-2
    # With kernel = 0 and a = b = I the output is dropout(x) itself: inverted dropout.
    eye = LoRADense(6, use_bias=False, lora=LoRAConfig(rank=6, dropout_rate=0.25))
    p = {"kernel": jnp.zeros((6, 6)), "lora_a": jnp.eye(6), "lora_b": jnp.eye(6)}
    x = jax.random.normal(jax.random.key(4), (64, 6))
    y = np.asarray(apply(eye, {"params": p}, x, deterministic=False, rngs=rngs))
    kept = y != 0
    np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
    assert 0.15 < 1 - kept.mean() < 0.35
    with pytest.raises(ValueError, match="deterministic"):
        apply(layer, {"params": params}, X)


def test_factor_dtype_and_promotion():
    layer = LoRADense(5, lora=LoRAConfig(rank=2, param_dtype=jnp.bfloat16))
    params = init(layer, X)["params"]
    assert params["kernel"].dtype == jnp.float32
    assert params["lora_a"].dtype == jnp.bfloat16 and params["lora_b"].dtype == jnp.bfloat16
    assert apply(layer, {"params": params}, X).dtype == jnp.float32


def test_initialisers():
    x = jnp.ones((1, 400))
    a = init(LoRADense(3, lora=LoRAConfig(rank=4)), x)["params"]["lora_a"]
    bound = 1.0 / np.sqrt(400)  # PEFT's kaiming_uniform_(a=sqrt(5))
    assert float(jnp.abs(a).max()) <= bound and float(jnp.abs(a).max()) > 0.9 * bound
    g = init(LoRADense(3, lora=LoRAConfig(rank=4, a_init="gaussian")), x)["params"]["lora_a"]
    np.testing.assert_allclose(float(jnp.std(g)), 1.0 / 4, rtol=0.1)
    with pytest.raises(ValueError, match="a_init"):
        LoRAConfig(a_init="xavier")


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_rank(bad):
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoRAConfig(rank=bad)


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        x = LoRADense(6, name="proj", lora=LoRAConfig(rank=2))(x)
        x = LoRAEinsum((6, 2, 3), "btd,dnh->btnh", name="heads", lora=LoRAConfig(rank=3))(x)
        return x.reshape((*x.shape[:-2], 6)), None


def test_nn_scan_stacks_pairs_and_preconditioner_runs():
    model = nn.scan(_Scanned, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)()
    variables = init(model, X, None)
    pairs = rplora_jax.find_lora_pairs(variables)
    assert [(p.a_path, p.rank, p.stacked_shape) for p in pairs] == [
        ("params/heads/lora_a", 3, (4,)),
        ("params/proj/lora_a", 2, (4,)),
    ]
    params = variables["params"]
    params["proj"]["lora_b"] = jax.random.normal(jax.random.key(5), (4, 2, 6))
    grads = jax.tree.map(jnp.ones_like, params)
    tx = rplora_jax.riemannian_preconditioner(reg=0.0, allow_no_pairs=False)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # Layer 1's a-gradient is preconditioned by layer 1's own b only.
    b1 = params["proj"]["lora_b"][1]
    want = grads["proj"]["lora_a"][1] @ jnp.linalg.inv(b1 @ b1.T)
    np.testing.assert_allclose(updates["proj"]["lora_a"][1], want, rtol=1e-4, atol=1e-4)


def test_lora_must_be_a_lora_config():
    with pytest.raises(TypeError, match=r"LoRADense.*expected a rplora_jax.LoRAConfig"):
        init(LoRADense(3, lora={"rank": 2}), X)
    assert LoRAConfig(rank=np.int64(4), alpha=np.float32(8.0)).scale == 2.0
