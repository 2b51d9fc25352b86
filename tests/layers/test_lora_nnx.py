"""NNX LoRA layers: wrapping existing layers, the scaled term, stacking, merge, LoRAParam grads."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rplora_jax
from rplora_jax import LoRAConfig, merge
from rplora_jax.layers.lora_nnx import LoRAEinsum, LoRALinear, LoRALinearGeneral

X = jax.random.normal(jax.random.key(1), (2, 3, 6))


def test_from_base_shares_base_and_matches_then_merges():
    base = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    y0 = base(X)
    layer = LoRALinear.from_base(base, LoRAConfig(rank=2, alpha=8.0), rngs=nnx.Rngs(1))
    assert layer.kernel is base.kernel and layer.bias is base.bias
    np.testing.assert_array_equal(layer(X), y0)
    assert layer.lora.scale == 4.0
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 4))
    a, b = layer.lora_a[...], layer.lora_b[...]
    want = y0 + 4.0 * (X @ a) @ b
    np.testing.assert_allclose(layer(X), want, rtol=1e-5, atol=1e-5)
    merged = merge(layer)
    assert type(merged) is nnx.Linear
    np.testing.assert_allclose(merged(X), layer(X), rtol=1e-5, atol=1e-5)
    assert isinstance(layer, LoRALinear)  # the LoRA model itself is untouched
    (pair,) = rplora_jax.find_lora_pairs(nnx.state(layer, nnx.LoRAParam))
    assert (pair.a_path, pair.b_path, pair.rank) == ("lora_a", "lora_b", 2)


def test_einsum_from_base_and_merge():
    base = nnx.Einsum("btd,dnh->btnh", (6, 2, 4), (2, 4), rngs=nnx.Rngs(0))
    y0 = base(X)
    layer = LoRAEinsum.from_base(base, LoRAConfig(rank=3, alpha=3.0, rslora=True), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(layer(X), y0)
    assert layer.lora_a.shape == (6, 3) and layer.lora_b.shape == (3, 2, 4)
    assert layer.lora.scale == pytest.approx(3.0 / np.sqrt(3.0))
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 2, 4))
    merged = merge(layer)
    assert type(merged) is nnx.Einsum
    np.testing.assert_allclose(merged(X), layer(X), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="was built for"):
        layer(X, einsum_str="btd,dnh->bnth")


def test_vmap_stacked_layers_pair_per_layer():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return LoRALinear(6, 6, lora=LoRAConfig(rank=2), rngs=nnx.Rngs(key))

    stacked = make(jax.random.split(jax.random.key(0), 3))
    (pair,) = rplora_jax.find_lora_pairs(nnx.state(stacked, nnx.LoRAParam))
    assert pair.stacked_shape == (3,) and pair.rank == 2

    @nnx.vmap(in_axes=0, out_axes=0)
    def make_base(key):
        return nnx.Linear(6, 6, rngs=nnx.Rngs(key))

    base = make_base(jax.random.split(jax.random.key(0), 3))
    wrapped = LoRALinear.from_base(base, LoRAConfig(rank=2), rngs=nnx.Rngs(1))
    assert wrapped.lora_a.shape == (3, 6, 2) and wrapped.lora_b.shape == (3, 2, 6)
    wrapped.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 2, 6))
    merged = merge(wrapped)  # folds each layer with its own factors
    want = base.kernel[...] + jnp.einsum("lir,lro->lio", wrapped.lora_a[...], wrapped.lora_b[...])
    np.testing.assert_allclose(merged.kernel[...], want, rtol=1e-5, atol=1e-6)
    # Layers built inside nnx.vmap know only their own shapes; merge folds them per layer too
    # (it contracted the wrong axes). Three layers and rank 3: the shapes cannot tell.
    made = nnx.vmap(lambda k: LoRALinear(6, 6, lora=LoRAConfig(rank=3), rngs=nnx.Rngs(k)))(
        jax.random.split(jax.random.key(0), 3)
    )
    made.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 3, 6))
    want = made.kernel[...] + jnp.einsum("lir,lro->lio", made.lora_a[...], made.lora_b[...])
    np.testing.assert_allclose(merge(made).kernel[...], want, rtol=1e-5, atol=1e-6)


def test_custom_init_on_stacked_layers_sees_one_layer():
    # A fan-in initializer called with the stack's shape (16, 64, 8) counted 16 * 64 inputs.
    base = nnx.vmap(lambda k: nnx.Linear(64, 64, rngs=nnx.Rngs(k)))(
        jax.random.split(jax.random.key(0), 16)
    )
    lecun = LoRAConfig(rank=8, a_init=jax.nn.initializers.lecun_normal())
    a = LoRALinear.from_base(base, lecun, rngs=nnx.Rngs(1)).lora_a[...]
    assert a.shape == (16, 64, 8) and abs(float(a.std()) - 64**-0.5) < 0.01
    assert float(jnp.abs(a[0] - a[1]).max()) > 0  # each layer its own draw


def test_grads_only_on_lora_params_and_dropout():
    layer = LoRALinear(6, 4, lora=LoRAConfig(rank=2, dropout_rate=0.5), rngs=nnx.Rngs(0))
    layer.lora_b[...] = jnp.ones((2, 4))

    def loss(m):
        return jnp.sum(m(X) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
    assert sorted(k for k, _ in nnx.to_flat_state(grads)) == [("lora_a",), ("lora_b",)]
    layer.eval()
    y_eval = layer(X)
    want = X @ layer.kernel[...] + layer.bias[...][None, None]
    want = want + (X @ layer.lora_a[...]) @ layer.lora_b[...]
    np.testing.assert_allclose(y_eval, want, rtol=1e-5, atol=1e-5)
    layer.train()
    assert float(jnp.abs(layer(X) - y_eval).max()) > 1e-3


def test_bad_options():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"rslora=True .* needs alpha"):
        LoRAConfig(rank=4, rslora=True)  # its scale would be 1 whatever the rank
    with pytest.raises(ValueError, match="dropout_rate"):
        LoRAConfig(rank=2, dropout_rate=1.0)
    with pytest.raises(TypeError, match="LoRAConfig"):
        LoRALinear(6, 4, lora=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ordered"):
        LoRAEinsum("btd,ndh->btnh", (2, 6, 4), lora=LoRAConfig(rank=2), rngs=nnx.Rngs(0))


def test_linear_general_term_and_merge():
    # The layer nnx.MultiHeadAttention's projections are made of, with two output axes and, for
    # the output projection, two contracted axes.
    x = jax.random.normal(jax.random.key(0), (2, 3, 2, 4))
    base = nnx.LinearGeneral((2, 4), 5, axis=(-2, -1), rngs=nnx.Rngs(0))
    y0 = base(x)
    layer = LoRALinearGeneral.from_base(base, LoRAConfig(rank=3, alpha=6.0), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(layer(x), y0)
    assert layer.lora_a.shape == (2, 4, 3) and layer.lora_b.shape == (3, 5)
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), (3, 5))
    delta = np.einsum("bthd,hdr,ro->bto", *map(np.asarray, (x, layer.lora_a, layer.lora_b)))
    np.testing.assert_allclose(layer(x), np.asarray(y0) + 2.0 * delta, rtol=1e-5, atol=1e-5)
    merged = merge(layer)
    assert type(merged) is nnx.LinearGeneral
    np.testing.assert_allclose(merged(x), layer(x), rtol=1e-5, atol=1e-5)


def test_linear_general_with_unsorted_axes_contracts_like_its_kernel():
    # nnx.LinearGeneral contracts its axes in sorted order; (3, 3) makes a wrong order silent.
    x = jax.random.normal(jax.random.key(0), (5, 3, 3))
    layer = LoRALinearGeneral((3, 3), 4, axis=(-1, -2), lora=LoRAConfig(rank=2, alpha=4.0),
                              rngs=nnx.Rngs(0))  # fmt: skip
    layer.lora_b[...] = jax.random.normal(jax.random.key(1), (2, 4))
    w = np.asarray(layer.kernel) + 2.0 * np.einsum("ijr,rk->ijk", layer.lora_a, layer.lora_b)
    expected = np.einsum("bij,ijk->bk", np.asarray(x), w) + np.asarray(layer.bias)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(merge(layer)(x), expected, rtol=1e-5, atol=1e-5)


class _Two(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jax.nn.relu(self.layers[0](x)))


def test_merge_folds_flax_lora_linear():
    layer = nnx.LoRALinear(6, 4, lora_rank=2, rngs=nnx.Rngs(0))
    layer.lora.lora_b[...] = jax.random.normal(jax.random.key(1), (2, 4))
    merged = merge(layer)
    assert type(merged) is nnx.Linear
    want = layer.kernel[...] + layer.lora.lora_a[...] @ layer.lora.lora_b[...]
    np.testing.assert_allclose(merged.kernel[...], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged(X), layer(X), rtol=1e-5, atol=1e-5)


def test_merge_of_flax_lora_linear_keeps_its_dot_general():
    # A custom dot_general (quantized or scaled matmuls) is part of the base layer: the merged
    # nnx.Linear used to fall back to lax.dot_general (output off by 2.17 with b = 0 here).
    def doubled(x, k, *args, **kwargs):
        return 2.0 * jax.lax.dot_general(x, k, *args, **kwargs)

    layer = nnx.LoRALinear(6, 4, lora_rank=2, dot_general=doubled, rngs=nnx.Rngs(0))
    merged = merge(layer)
    assert merged.dot_general is doubled
    np.testing.assert_allclose(merged(X), layer(X), rtol=1e-6, atol=1e-6)
    # nnx.LoRALinear adds x @ a @ b outside its dot_general; merged, that term goes through it.
    layer.lora.lora_b[...] = jax.random.normal(jax.random.key(1), (2, 4))
    delta = X @ layer.lora.lora_a[...] @ layer.lora.lora_b[...]
    np.testing.assert_allclose(merge(layer)(X), layer(X) + delta, rtol=1e-5, atol=1e-5)


def test_merge_refuses_what_it_cannot_fold():
    # A standalone nnx.LoRA (or qwix's <w>_lora_a params) has no kernel merge can fold into:
    # the model must not come back silently unmerged.
    model = _Two(nnx.Rngs(0))
    model.adapter = nnx.LoRA(4, 2, 3, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="adapter/lora_a"):
        merge(model)
    with pytest.raises(ValueError, match="stores its own scale"):
        merge(LoRALinear(4, 3, lora=LoRAConfig(rank=2), rngs=nnx.Rngs(0)), scale=2.0)


def test_merge_of_a_model_with_qwix_factors_shows_the_call_that_folds_them():
    # qwix adds <w>_lora_a / <w>_lora_b parameters next to <w>; merge(module) cannot turn such a
    # layer into a plain one, but the parameter dict folds with the scale, as the error says.
    class QwixLike(nnx.Module):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.w = nnx.Param(jnp.asarray(rng.standard_normal((4, 3)), jnp.float32))
            self.w_lora_a = nnx.LoRAParam(jnp.asarray(rng.standard_normal((4, 2)), jnp.float32))
            self.w_lora_b = nnx.LoRAParam(jnp.asarray(rng.standard_normal((2, 3)), jnp.float32))

    model = QwixLike()
    call = "rplora_jax.merge(nnx.to_pure_dict(nnx.state(model, nnx.Param)), scale=alpha / rank)"
    with pytest.raises(
        ValueError, match=r"\['w_lora_a'\]\. Factors stored as .*" + re.escape(call)
    ):
        merge(model)
    merged = merge(nnx.to_pure_dict(nnx.state(model, nnx.Param)), scale=0.5)
    want = model.w[...] + 0.5 * model.w_lora_a[...] @ model.w_lora_b[...]
    assert sorted(merged) == ["w"]
    np.testing.assert_allclose(merged["w"], want, rtol=1e-6, atol=1e-6)


def test_merge_refuses_integer_kernel():
    layer = LoRALinear(4, 3, lora=LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    layer.kernel = nnx.Param(jnp.full((4, 3), 7, jnp.int8))  # a quantized base
    with pytest.raises(ValueError, match="int8 kernel"):
        merge(layer)


@pytest.mark.parametrize(
    "make",
    [rplora_jax.scaled_adamw, rplora_jax.lora_rite, rplora_jax.reflora_adamw],
    ids=["scaled_adamw", "lora_rite", "reflora_adamw"],
)
def test_every_lora_optimizer_trains_an_nnx_model_through_lorap_params(make):
    # nnx.Optimizer(..., wrt=nnx.LoRAParam) hands the optimizer the factors only.
    model = _Two(nnx.Rngs(0))
    base = model.layers[1]
    model.layers[1] = LoRALinear.from_base(base, LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, make(1e-2), wrt=nnx.LoRAParam)
    x, y = jnp.ones((4, 4)), jnp.zeros((4, 3))
    loss = lambda m: jnp.mean((m(x) - y) ** 2)
    kernel = model.layers[1].kernel[...]
    first = float(loss(model))
    for _ in range(5):
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
    assert float(loss(model)) < first
    np.testing.assert_array_equal(model.layers[1].kernel[...], kernel)
