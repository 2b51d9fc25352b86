"""LoRA injected into the example transformer (linen and NNX): equality at init, pairing,
training with scaled_adamw, frozen base, merge, adapter round trip, and bad target rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx, traverse_util
from script_loader import load_script

import rplora_jax
from rplora_jax import adapters, inject
from rplora_jax import nnx as lora_nnx

ex = load_script("examples/lora_transformer.py")

CFG = ex.Config()
TOKENS = ex.make_batch(jax.random.key(123), CFG)
PROJECTIONS = ["attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"]


@pytest.fixture(scope="module")
def linen_run():
    return ex.train_linen(steps=15)


@pytest.fixture(scope="module")
def nnx_run():
    return ex.train_nnx(steps=15)


def test_linen_equal_at_init_and_pairs(linen_run):
    lora, pretrained, _, _ = linen_run
    expected = [f"block_{i}/{p}" for i in range(CFG.num_layers) for p in PROJECTIONS]
    assert lora.target_paths(TOKENS) == sorted(expected)
    fresh = lora.init_from(pretrained, jax.random.key(1), TOKENS)
    pairs = rplora_jax.find_lora_pairs(fresh)
    assert sorted(p.a_path for p in pairs) == sorted(f"params/{p}/lora_a" for p in expected)
    assert all(p.rank == 4 and p.stacked_shape == () for p in pairs)
    y_lora, y_base = jax.jit(lambda f, p: (lora.apply(f, TOKENS), lora.module.apply(p, TOKENS)))(
        fresh, pretrained
    )
    np.testing.assert_array_equal(y_lora, y_base)


def test_linen_training_freezes_base_and_merges(linen_run, tmp_path):
    lora, pretrained, variables, losses = linen_run
    assert losses[-1] < 0.5 * losses[0]
    flat_pre = traverse_util.flatten_dict(pretrained)
    flat = traverse_util.flatten_dict(variables)
    factors = {k for k in flat if k[-1] in ("lora_a", "lora_b")}
    assert len(factors) == 2 * 6 * CFG.num_layers and set(flat) - factors == set(flat_pre)
    for k, v in flat_pre.items():  # gradients reached only the factors
        np.testing.assert_array_equal(flat[k], v)
    assert all(float(jnp.abs(flat[k]).max()) > 0 for k in factors if k[-1] == "lora_b")

    merged = lora.merge(variables)
    assert jax.tree.structure(merged) == jax.tree.structure(pretrained)
    y_merged, y_lora, y_pre = jax.jit(
        lambda m, v, p: (
            lora.module.apply(m, TOKENS),
            lora.apply(v, TOKENS),
            lora.module.apply(p, TOKENS),
        )
    )(merged, variables, pretrained)
    np.testing.assert_allclose(y_merged, y_lora, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(y_lora - y_pre).max()) > 1e-2

    adapter = adapters.extract_adapter(variables)
    restored = adapters.unmerge(merged, adapter, lora.scaling)
    for k, v in traverse_util.flatten_dict(restored).items():
        np.testing.assert_allclose(v, flat[k], rtol=0, atol=1e-5)

    file = tmp_path / "adapter.safetensors"
    adapters.save_adapter(str(file), variables, metadata={"rank": "4"})
    fresh = lora.init_from(pretrained, jax.random.key(7), TOKENS)
    loaded = adapters.load_adapter(str(file), into=fresh)
    for k, v in traverse_util.flatten_dict(loaded).items():
        np.testing.assert_array_equal(v, flat[k])  # bit-exact round trip
    n_factor = sum(flat[k].size for k in factors)
    assert file.stat().st_size < 4 * n_factor + 8192  # only the factors are stored


def test_linen_nn_scan_injection_stacks_pairs():
    model = ex.LinenTransformer(CFG, scan_layers=True)
    lora = inject.inject_linen(model, ex.LINEN_TARGETS, rank=2)
    # Shapes are enough for the pairing: trace only, no compilation.
    variables = jax.eval_shape(lora.init, jax.random.key(0), TOKENS)
    pairs = rplora_jax.find_lora_pairs(variables)
    assert sorted(p.a_path for p in pairs) == sorted(
        f"params/blocks/{p}/lora_a" for p in PROJECTIONS
    )
    assert all(p.stacked_shape == (CFG.num_layers,) and p.rank == 2 for p in pairs)


def test_nnx_equal_at_init_trains_and_merges(nnx_run):
    model, original, losses = nnx_run
    assert losses[-1] < 0.5 * losses[0]
    pairs = rplora_jax.find_lora_pairs(nnx.state(model, nnx.LoRAParam))
    expected = [f"blocks/{i}/{p}" for i in range(CFG.num_layers) for p in PROJECTIONS]
    assert sorted(p.a_path for p in pairs) == sorted(f"{p}/lora_a" for p in expected)
    # Frozen base: every non-LoRA parameter is still the original's.
    base_now = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    base_orig = dict(nnx.to_flat_state(nnx.state(original)))
    assert {k for k, _ in base_now} == set(base_orig)
    for k, v in base_now:
        np.testing.assert_array_equal(v[...], base_orig[k][...])

    fresh = nnx.clone(original)
    inject.inject_nnx(fresh, ex.NNX_TARGETS, rank=2, rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(fresh(TOKENS), original(TOKENS))

    merged = lora_nnx.merge(model)
    assert nnx.graphdef(merged) == nnx.graphdef(original)
    np.testing.assert_allclose(merged(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)
    count = adapters.count_parameters(model)
    assert count.trainable == sum(
        np.size(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    )


def test_nnx_vmap_stacked_injection():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.vmap(in_axes=0, out_axes=0)
            def make(key):
                return nnx.Linear(6, 6, rngs=nnx.Rngs(key))

            self.layers = make(jax.random.split(rngs.params(), 3))
            self.norm = nnx.LayerNorm(6, rngs=rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def body(layer, x):
                return jnp.tanh(layer(x))

            return body(self.layers, self.norm(x))

    model = Stack(nnx.Rngs(0))
    y0 = model(X := jax.random.normal(jax.random.key(1), (2, 6)))
    assert inject.inject_nnx(model, "layers", rank=2, rngs=nnx.Rngs(1)) == ["layers"]
    (pair,) = rplora_jax.find_lora_pairs(nnx.state(model, nnx.LoRAParam))
    assert pair.stacked_shape == (3,)
    # Inside the compiled scan XLA may fuse the unchanged matmul differently: 1 ulp.
    np.testing.assert_allclose(model(X), y0, rtol=1e-6, atol=1e-6)


def test_bad_target_rules_linen():
    model = ex.LinenTransformer(CFG)
    with pytest.raises(ValueError, match=r"matched no module.*'block_0/attn/query'"):
        inject.inject_linen(model, r"attn/query", rank=2).init(jax.random.key(0), TOKENS)
    with pytest.raises(ValueError, match=r"'block_0/ln1', a LayerNorm, which is not a linear"):
        inject.inject_linen(model, r"block_\d/ln1", rank=2).init(jax.random.key(0), TOKENS)
    with pytest.raises(ValueError, match=r"'block_0/attn', a LinenAttention"):
        inject.inject_linen(model, r"block_0/attn.*", rank=2).init(jax.random.key(0), TOKENS)
    with pytest.raises(ValueError, match="invalid regular expression"):
        inject.inject_linen(model, r"block_(", rank=2)


def test_bad_target_rules_nnx():
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"matched no module.*'layers/0'"):
        inject.inject_nnx(model, r"0", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'layers/1', a LayerNorm, which is not a linear"):
        inject.inject_nnx(model, r"layers/\d", rank=2, rngs=nnx.Rngs(0))
    inject.inject_nnx(model, r"layers/0", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject.inject_nnx(model, r"layers/0", rank=2, rngs=nnx.Rngs(0))


def test_linen_einsum_injection_checks_kernel_order():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 6, 4), "btd,ndh->btnh", name="proj")(x)

    x = jnp.ones((1, 3, 6))
    with pytest.raises(ValueError, match=r"LoRA on 'proj'.*ordered"):
        inject.inject_linen(M(), "proj", rank=2).init(jax.random.key(0), x)
