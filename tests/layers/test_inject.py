"""LoRA injected into the example transformer (linen and NNX): equality at init, pairing,
training with scaled_adamw, frozen base, merge, adapter round trip, and bad target rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx, traverse_util
from reference import AdamW, precondition_flax
from script_loader import load_script

import rplora_jax
from rplora_jax import LoRAConfig, adapters, inject_linen, inject_nnx
from rplora_jax._trees import path_str
from rplora_jax.layers.lora_nnx import LoRALinear
from rplora_jax.partition import count_parameters

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


@pytest.mark.slow
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


def _flat(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): np.asarray(v) for p, v in flat}


def _replay(factors, grad_fn, batches):
    """Scaled AdamW on the factors, transcribed in NumPy float64 (reference.py); the gradients
    come from JAX at the replayed parameters."""
    pairs = rplora_jax.find_lora_pairs(factors)
    params = {k: np.asarray(v, np.float64) for k, v in _flat(factors).items()}
    names = sorted(params)
    opt = AdamW(ex.LR, weight_decay=0.0)
    for tokens in batches:
        g = _flat(grad_fn({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, tokens))
        pre = dict(g)
        for p in pairs:
            pre[p.a_path], pre[p.b_path] = precondition_flax(
                g[p.a_path], g[p.b_path], params[p.a_path], params[p.b_path], rplora_jax.DEFAULT_REG
            )
        new = opt.step([params[n] for n in names], [pre[n] for n in names])
        params = dict(zip(names, new, strict=True))
    return params


def _assert_close_to_replay(got, want):
    # Adam divides by |g|: a float32 gradient near 0 can flip an update's sign, so a few
    # entries may differ by up to 2 * lr; all others agree to float32 accuracy.
    for k in want:
        err = np.abs(np.asarray(got[k], np.float64) - want[k])
        assert np.mean(err < 1e-4) > 0.995, (k, float(np.mean(err < 1e-4)))
        assert float(err.max()) <= 2.5 * ex.LR * 3, k


@pytest.mark.slow
def test_linen_training_matches_numpy_replay():
    steps = 3
    lora, pretrained, variables, _ = ex.train_linen(steps=steps)
    _, k_lora, k_data = jax.random.split(jax.random.key(0), 3)
    fresh = lora.init_from(pretrained, k_lora, ex.make_batch(k_data, CFG))
    factor_paths = {
        p for pair in rplora_jax.find_lora_pairs(fresh) for p in (pair.a_path, pair.b_path)
    }
    base = {k: v for k, v in _flat(fresh).items() if k not in factor_paths}

    def loss(factors, tokens):
        flat = {**base, **factors}
        tree = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
        return ex.next_token_loss(lora.apply(tree, tokens), tokens)

    factors = {k: v for k, v in _flat(fresh).items() if k in factor_paths}
    batches = [ex.make_batch(jax.random.fold_in(k_data, i), CFG) for i in range(steps)]
    want = _replay(factors, jax.jit(jax.grad(loss)), batches)
    _assert_close_to_replay({k: v for k, v in _flat(variables).items() if k in want}, want)
    # The preconditioner changed the result: plain AdamW's factors differ by far more.
    plain = _replay_plain(factors, jax.jit(jax.grad(loss)), batches)
    diffs = [np.abs(plain[k] - want[k]).max() for k in want if k.endswith("lora_b")]
    assert max(diffs) > 1e-3


def _replay_plain(factors, grad_fn, batches):
    params = {k: np.asarray(v, np.float64) for k, v in factors.items()}
    names = sorted(params)
    opt = AdamW(ex.LR, weight_decay=0.0)
    for tokens in batches:
        g = _flat(grad_fn({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, tokens))
        new = opt.step([params[n] for n in names], [g[n] for n in names])
        params = dict(zip(names, new, strict=True))
    return params


@pytest.mark.slow
def test_linen_training_freezes_base_and_merges(linen_run, tmp_path):
    lora, pretrained, variables, _ = linen_run
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
    restored = rplora_jax.unmerge(merged, adapter, scale=lora.lora.scale)
    for k, v in traverse_util.flatten_dict(restored).items():
        np.testing.assert_allclose(v, flat[k], rtol=0, atol=1e-5)

    file = tmp_path / "adapter.safetensors"
    rplora_jax.save_adapter(str(file), variables, metadata={"rank": "4"})
    fresh = lora.init_from(pretrained, jax.random.key(7), TOKENS)
    loaded = rplora_jax.load_adapter(str(file), into=fresh)
    for k, v in traverse_util.flatten_dict(loaded).items():
        np.testing.assert_array_equal(v, flat[k])  # bit-exact round trip
    n_factor = sum(flat[k].size for k in factors)
    assert file.stat().st_size < 4 * n_factor + 8192  # only the factors are stored


def test_linen_nn_scan_injection_stacks_pairs():
    model = ex.LinenTransformer(CFG, scan_layers=True)
    lora = inject_linen(model, ex.LINEN_TARGETS, LoRAConfig(rank=2))
    # Shapes are enough for the pairing: trace only, no compilation.
    variables = jax.eval_shape(lora.init, jax.random.key(0), TOKENS)
    pairs = rplora_jax.find_lora_pairs(variables)
    assert sorted(p.a_path for p in pairs) == sorted(
        f"params/blocks/{p}/lora_a" for p in PROJECTIONS
    )
    assert all(p.stacked_shape == (CFG.num_layers,) and p.rank == 2 for p in pairs)


@pytest.mark.slow
def test_nnx_equal_at_init_trains_and_merges(nnx_run):
    model, original, losses = nnx_run
    assert np.all(np.isfinite(losses)) and len(losses) == 15
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
    inject_nnx(fresh, ex.NNX_TARGETS, LoRAConfig(rank=2), rngs=nnx.Rngs(5))
    np.testing.assert_array_equal(fresh(TOKENS), original(TOKENS))

    merged = rplora_jax.merge(model)
    assert nnx.graphdef(merged) == nnx.graphdef(original)
    np.testing.assert_allclose(merged(TOKENS), model(TOKENS), rtol=1e-4, atol=1e-4)
    count = count_parameters(model)
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
    assert inject_nnx(model, "layers", LoRAConfig(rank=2), rngs=nnx.Rngs(1)) == ["layers"]
    (pair,) = rplora_jax.find_lora_pairs(nnx.state(model, nnx.LoRAParam))
    assert pair.stacked_shape == (3,)
    # Inside the compiled scan XLA may fuse the unchanged matmul differently: 1 ulp.
    np.testing.assert_allclose(model(X), y0, rtol=1e-6, atol=1e-6)


def test_nnx_vmap_stacked_injection_with_dropout():
    # The dropout's rng key and count used to stay scalars beside the stacked factors, so
    # nnx.scan over the layers failed (IndexError), in eval mode too.
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return nnx.Linear(6, 6, rngs=rngs)

    model = nnx.Dict({"layers": make(nnx.Rngs(0))})
    lora = LoRAConfig(rank=2, dropout_rate=0.5)
    assert inject_nnx(model, "layers", lora, rngs=nnx.Rngs(1)) == ["layers"]
    keys = nnx.state(model, nnx.RngKey)["layers"]["lora_dropout"]["rngs"]["key"][...]
    assert keys.shape == (3,) and len({tuple(jax.random.key_data(k).tolist()) for k in keys}) == 3
    scan = nnx.scan(lambda layer, x: layer(x), in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    x = jnp.ones((2, 6))
    model["layers"].lora_b[...] = jnp.ones((3, 2, 6))  # so that dropout changes the output
    model.eval()
    y_eval = scan(model["layers"], x)
    model.train()
    y_train = scan(model["layers"], x)
    assert y_eval.shape == y_train.shape == (2, 6)
    assert np.all(np.isfinite(y_train)) and not np.allclose(y_train, y_eval)


def test_nnx_tied_layer_gets_one_lora_layer_at_every_path():
    # nnx.iter_modules lists a shared layer once ('dec'): 'enc' used to stay a plain Linear,
    # silently breaking the tie.
    class Tied(nnx.Module):
        def __init__(self):
            self.enc = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.dec = self.enc

        def __call__(self, x):
            return self.dec(jnp.tanh(self.enc(x)))

    model = Tied()
    y0 = model(x := jnp.ones((2, 4)))
    assert inject_nnx(model, r".+", LoRAConfig(rank=2), rngs=nnx.Rngs(1)) == ["dec", "enc"]
    assert isinstance(model.enc, LoRALinear) and model.enc is model.dec
    np.testing.assert_allclose(model(x), y0, rtol=1e-6, atol=1e-6)
    assert len(rplora_jax.find_lora_pairs(nnx.state(model, nnx.LoRAParam))) == 1
    # Merging keeps the tie too: one plain Linear at both paths (it used to refuse 'enc').
    model.enc.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 4))
    merged = rplora_jax.merge(model)
    assert type(merged.enc) is nnx.Linear and merged.enc is merged.dec
    np.testing.assert_allclose(merged(x), model(x), rtol=1e-5, atol=1e-5)


def test_nnx_injection_into_an_eval_mode_model_keeps_lora_dropout_off():
    model = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    model.eval()
    inject_nnx(model, "layers/0", LoRAConfig(rank=2, dropout_rate=0.5), rngs=nnx.Rngs(2))
    model.layers[0].lora_b[...] = jnp.ones((2, 8))
    x = jnp.ones((1, 8))
    np.testing.assert_array_equal(model(x), model(x))  # nothing drops in eval mode
    model.train()
    assert float(jnp.abs(model(x) - model(x)).max()) > 0  # and it follows train() after
    fresh = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.Dropout(0.5, rngs=nnx.Rngs(1)))
    inject_nnx(fresh, "layers/0", LoRAConfig(rank=2, dropout_rate=0.5), rngs=nnx.Rngs(2))
    assert fresh.layers[0].lora_dropout.deterministic is False  # a training-mode model: as is
    # A model whose only mode-bearing layer is a BatchNorm says its mode just as well.
    bn = nnx.Sequential(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), nnx.BatchNorm(8, rngs=nnx.Rngs(1)))
    bn.eval()
    inject_nnx(bn, "layers/0", LoRAConfig(rank=2, dropout_rate=0.5), rngs=nnx.Rngs(2))
    assert bn.layers[0].lora_dropout.deterministic is True


R2 = LoRAConfig(rank=2)


def test_bad_target_rules_linen():
    model = ex.LinenTransformer(CFG)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"matched no module.*'block_0/attn/query'"):
        inject_linen(model, r"attn/query", R2).init(key, TOKENS)
    with pytest.raises(ValueError, match=r"'block_0/ln1', a LayerNorm, which is not a linear"):
        inject_linen(model, r"block_\d/ln1", R2).init(key, TOKENS)
    with pytest.raises(ValueError, match=r"'block_0/attn', a LinenAttention"):
        inject_linen(model, r"block_0/attn.*", R2).init(key, TOKENS)
    with pytest.raises(ValueError, match="invalid regular expression"):
        inject_linen(model, r"block_(", R2)
    with pytest.raises(TypeError, match="LoRAConfig"):
        inject_linen(model, r"block_0/mlp/fc1", 2)
    # One pattern of a list that matches nothing is named, even when the others match.
    with pytest.raises(ValueError, match=r"\['block_0/mlp/fc3'\] match no module"):
        inject_linen(model, [r"block_0/mlp/fc1", r"block_0/mlp/fc3"], R2).init(key, TOKENS)
    with pytest.raises(ValueError, match=r"\['nothing'\] match no module"):
        inject_linen(model, [r"block_0/mlp/fc1", r"nothing"], R2).target_paths(TOKENS)


def test_linen_lora_added_twice_is_a_clear_error():
    from rplora_jax.layers.lora_linen import LoRADense

    x, key = jnp.ones((1, 4)), jax.random.key(0)
    # A layer that already is a LoRA layer cannot be targeted again.
    lora_layer = inject_linen(nn.Sequential([LoRADense(3, lora=R2)]), r"layers_0", R2)
    with pytest.raises(ValueError, match=r"'layers_0', a LoRADense, which already has LoRA"):
        lora_layer.init(key, x)

    class Proj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="proj")(x)

    # Injection run inside another injection of the same layer: the library's message, not
    # Flax's NameInUseError.
    outer, inner = inject_linen(Proj(), r"proj", R2), inject_linen(Proj(), r"proj", R2)
    with pytest.raises(ValueError, match=r"'proj' already has LoRA factors"):
        outer._run(lambda: inner.init(key, x), True)


def test_bad_target_rules_nnx():
    model = nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), nnx.LayerNorm(4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"matched no module.*'layers/0'"):
        inject_nnx(model, r"0", R2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'layers/1', a LayerNorm, which is not a linear"):
        inject_nnx(model, r"layers/\d", R2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\['layers/2'\] match no module"):
        inject_nnx(model, [r"layers/0", r"layers/2"], R2, rngs=nnx.Rngs(0))
    inject_nnx(model, r"layers/0", R2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_nnx(model, r"layers/0", R2, rngs=nnx.Rngs(0))


def test_nnx_injection_errors_name_the_layer():
    class Sub(nnx.Linear):  # inject_nnx replaces layers: a subclass's behaviour would be lost
        pass

    model = nnx.Dict(proj=Sub(4, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"'proj', a Sub, a subclass of nnx.Linear"):
        inject_nnx(model, "proj", R2, rngs=nnx.Rngs(0))
    model = nnx.Dict(bat=nnx.LinearGeneral(4, 4, batch_axis={0: 2}, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"inject_nnx: 'bat': LoRA does not support .*batch_axis"):
        inject_nnx(model, "bat", R2, rngs=nnx.Rngs(0))


def test_nnx_multi_head_attention_gets_lora():
    attn = nnx.MultiHeadAttention(
        num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    y0 = attn(x)
    paths = inject_nnx(attn, r"query|value|out", LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    assert paths == ["out", "query", "value"]
    np.testing.assert_array_equal(attn(x), y0)
    pairs = {p.a_path: p for p in rplora_jax.find_lora_pairs(nnx.state(attn, nnx.LoRAParam))}
    assert pairs["query/lora_a"].rank == 2 and attn.query.lora_b.shape == (2, 2, 4)
    assert attn.out.lora_a.shape == (2, 4, 2)  # contracts (heads, head_dim)
    for name in ("query", "value", "out"):
        layer = getattr(attn, name)
        layer.lora_b[...] = jax.random.normal(jax.random.key(2), layer.lora_b.shape)
    merged = rplora_jax.merge(attn)
    assert type(merged.query) is nnx.LinearGeneral
    np.testing.assert_allclose(merged(x), attn(x), rtol=1e-5, atol=1e-5)


def test_linen_einsum_injection_checks_kernel_order():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 6, 4), "btd,ndh->btnh", name="proj")(x)

    x = jnp.ones((1, 3, 6))
    with pytest.raises(ValueError, match=r"LoRA on 'proj'.*ordered"):
        inject_linen(M(), "proj", R2).init(jax.random.key(0), x)


def test_linen_apply_without_factors_says_how_to_make_them():
    model = nn.Sequential([nn.Dense(3), nn.Dense(2)])
    x = jnp.ones((1, 4))
    pretrained = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"no LoRA factors.*init_from"):
        inject_linen(model, r"layers_0", R2).apply(pretrained, x)
