"""merge/unmerge: the numbers, each supported layout, and the errors for the others."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from params_fixture import params_tree

import rplora_jax
from rplora_jax import adapters


def test_merge_unmerge_numbers():
    params = params_tree()
    merged = rplora_jax.merge(params, scale=0.5)
    assert sorted(merged["q"]) == ["bias", "kernel"] and sorted(merged["stack"]) == ["kernel"]
    q = params["q"]
    np.testing.assert_allclose(
        merged["q"]["kernel"], q["kernel"] + 0.5 * q["lora_a"] @ q["lora_b"], rtol=1e-6
    )
    s = jax.tree.map(lambda x: np.asarray(x, np.float32), params["stack"])
    want = s["kernel"] + 0.5 * np.einsum("lir,lro->lio", s["lora_a"], s["lora_b"])
    np.testing.assert_allclose(merged["stack"]["kernel"], want, rtol=1e-5, atol=1e-6)
    restored = rplora_jax.unmerge(merged, adapters.extract_adapter(params), scale=0.5)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)
    kept = rplora_jax.merge(params, scale=lambda path: 1.0, keep_factors=True)
    assert "lora_a" in kept["q"]


def test_merge_nnx_lora_linear_layout_and_errors():
    params = {
        "layer": {
            "kernel": jnp.zeros((3, 2)),
            "lora": {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))},
        }
    }
    merged = rplora_jax.merge(params, scale=1.0)
    np.testing.assert_array_equal(merged["layer"]["kernel"], np.ones((3, 2)))
    bad = {"kernel": jnp.zeros((3, 3)), "lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))}
    with pytest.raises(ValueError, match="'lora_a' has shape"):
        rplora_jax.merge(bad, scale=1.0)
    with pytest.raises(ValueError, match="no base kernel"):
        rplora_jax.merge(
            {"w": jnp.ones((3, 3)), "lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 3))},
            scale=1.0,
        )


def test_merge_requires_the_scale_for_dicts():
    # A dict does not record alpha / r: a default of 1.0 silently merged the wrong amount.
    with pytest.raises(TypeError, match="needs scale="):
        rplora_jax.merge(params_tree())
    with pytest.raises(TypeError, match="needs scale="):
        rplora_jax.unmerge(params_tree(), {})


def test_merge_qwix_layout():
    rng = np.random.default_rng(1)
    w, a, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 3), (4, 2), (2, 3)))
    params = {"mlp": {"w": w, "w_lora_a": a, "w_lora_b": b, "bias": np.zeros(3, np.float32)}}
    merged = rplora_jax.merge(params, scale=0.25)
    assert sorted(merged["mlp"]) == ["bias", "w"]
    np.testing.assert_allclose(merged["mlp"]["w"], w + 0.25 * a @ b, rtol=1e-6, atol=1e-6)
    back = rplora_jax.unmerge(merged, {"mlp/w_lora_a": a, "mlp/w_lora_b": b}, scale=0.25)
    np.testing.assert_allclose(back["mlp"]["w"], w, atol=1e-6)


@pytest.mark.parametrize(
    "params, rule",
    [
        (
            {"q": {"w": np.ones((4, 3)), "lora": {"a": np.ones((4, 2)), "b": np.ones((2, 3))}}},
            "lora/a",
        ),
        (
            {
                "q": {
                    "kernel": np.ones((4, 3)),
                    "lora_A": np.ones((2, 4)),
                    "lora_B": np.ones((3, 2)),
                }
            },
            "lora_A",
        ),
    ],
)
def test_merge_refuses_layouts_it_cannot_place(params, rule):
    params = jax.tree.map(lambda x: x.astype(np.float32), params)
    rules = rplora_jax.PEFT if rule == "lora_A" else None
    with pytest.raises(ValueError, match=r"cannot fold the pair 'q/"):
        rplora_jax.merge(params, scale=1.0, rules=rules)


def test_merge_refuses_integer_kernel():
    # Folding 0.16-sized LoRA effects into an int8 kernel truncated them (error 3.7).
    params = {
        "kernel": np.full((4, 3), 7, np.int8),
        "lora_a": np.full((4, 2), 0.2, np.float32),
        "lora_b": np.full((2, 3), 0.2, np.float32),
    }
    with pytest.raises(ValueError, match=r"'kernel' is int8.*truncate"):
        rplora_jax.merge(params, scale=1.0)


def test_unmerge_nnx_pure_dict_with_list():
    # nnx.List gives integer keys in nnx.to_pure_dict: putting the factors back used to mix
    # '0' and 0 keys and crash while sorting the pytree.
    from flax import nnx

    from rplora_jax.layers.lora_nnx import LoRALinear

    class Net(nnx.Module):
        def __init__(self, rngs):
            lora = rplora_jax.LoRAConfig(rank=2, alpha=4.0)
            self.layers = nnx.List(
                [LoRALinear(4, 4, lora=lora, rngs=rngs), LoRALinear(4, 3, lora=lora, rngs=rngs)]
            )

    net = Net(nnx.Rngs(0))
    for layer in net.layers:
        layer.lora_b[...] = jnp.full(layer.lora_b.shape, 0.3)
    state = nnx.to_pure_dict(nnx.state(net, nnx.Param))
    adapter = adapters.extract_adapter(state)
    merged = rplora_jax.merge(state, scale=2.0)
    assert sorted(merged["layers"][0]) == ["bias", "kernel"]
    restored = rplora_jax.unmerge(merged, adapter, scale=2.0)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    # The NNX model merges with each layer's stored scale; same kernels as the dict route.
    merged_net = rplora_jax.merge(net)
    np.testing.assert_allclose(
        merged_net.layers[1].kernel[...], merged["layers"][1]["kernel"], rtol=1e-6, atol=1e-6
    )


def test_merge_scale_must_be_a_number():
    with pytest.raises(TypeError, match="scale must be a number"):
        rplora_jax.merge(params_tree(), scale="2")


def test_unmerge_puts_factors_back_under_flat_dotted_keys():
    # A flat checkpoint keyed 'q.kernel': each factor goes back next to its own kernel, and each
    # kernel gets its own a @ b subtracted (both went to top-level 'lora_a'/'lora_b' before).
    params = {
        "q.kernel": jnp.zeros((2, 2)),
        "q.lora_a": jnp.ones((2, 1)),
        "q.lora_b": jnp.ones((1, 2)),
        "k.kernel": jnp.zeros((2, 2)),
        "k.lora_a": 2 * jnp.ones((2, 1)),
        "k.lora_b": jnp.ones((1, 2)),
        "v/lora/lora_a": 3 * jnp.ones((2, 1)),
        "v/lora/lora_b": jnp.ones((1, 2)),
        "v/kernel": jnp.zeros((2, 2)),
    }
    merged = rplora_jax.merge(params, scale=1.0)
    assert sorted(merged) == ["k.kernel", "q.kernel", "v/kernel"]
    np.testing.assert_array_equal(merged["k.kernel"], np.full((2, 2), 2.0))
    back = rplora_jax.unmerge(merged, adapters.extract_adapter(params), scale=1.0)
    assert sorted(back) == sorted(params)
    for key, value in params.items():
        np.testing.assert_array_equal(back[key], value)


def test_merge_and_unmerge_with_flatten_dict_tuple_keys():
    from flax import traverse_util

    nested = {"params": {"fc": {"kernel": jnp.zeros((3, 4)), "lora_a": jnp.ones((3, 2)),
                                "lora_b": jnp.ones((2, 4))}}}  # fmt: skip
    flat = traverse_util.flatten_dict(nested)
    merged = rplora_jax.merge(flat, scale=0.5)
    np.testing.assert_array_equal(merged[("params", "fc", "kernel")], np.ones((3, 4)))
    adapter = {k: v for k, v in flat.items() if k[-1].startswith("lora")}
    back = rplora_jax.unmerge(merged, adapter, scale=0.5)
    assert sorted(back) == sorted(flat)
    np.testing.assert_array_equal(back[("params", "fc", "kernel")], np.zeros((3, 4)))
    # nnx lists' int keys stay ints next to their kernels (not '0').
    listed = traverse_util.flatten_dict({"layers": {0: nested["params"]["fc"]}})
    back = rplora_jax.unmerge(
        rplora_jax.merge(listed, scale=0.5),
        {k: v for k, v in listed.items() if k[-1].startswith("lora")},
        scale=0.5,
    )
    assert set(back) == set(listed)


def test_unmerge_reads_ambiguous_shapes_as_merge_did():
    # One layer with input axes (2, 5) and output axes (2, 7), rank 2: the factors alone also
    # read as 2 stacked layers; the merged kernel settles it for unmerge as for merge.
    a = jax.random.normal(jax.random.key(0), (2, 5, 2))
    b = jax.random.normal(jax.random.key(1), (2, 2, 7))
    params = {"d": {"kernel": jnp.zeros((2, 5, 2, 7)), "lora_a": a, "lora_b": b}}
    merged = rplora_jax.merge(params, scale=1.0)
    back = rplora_jax.unmerge(merged, adapters.extract_adapter(params), scale=1.0)
    np.testing.assert_allclose(back["d"]["kernel"], np.zeros((2, 5, 2, 7)), atol=1e-5)
    stacked = rplora_jax.merge({"d": {"lora_a": a, "lora_b": b, "kernel": jnp.zeros((2, 5, 7))}},
                               scale=1.0, stacked_axes=1)  # fmt: skip
    assert stacked["d"]["kernel"].shape == (2, 5, 7)


def test_merge_and_unmerge_without_pairs_raise():
    # PEFT-named factors under the default rules are not pairs: returning the dict unchanged
    # would hand back an unmerged model as if merged.
    peft_named = {"q": {"weight": jnp.zeros((2, 2)), "lora_A": jnp.ones((1, 2))}}
    with pytest.raises(
        ValueError,
        match=r"merge found no LoRA pairs among 2 leaves "
        r"\(first paths: \['q/lora_A', 'q/weight'\]\)",
    ):
        rplora_jax.merge(peft_named, scale=1.0)
    with pytest.raises(ValueError, match=r"unmerge \(in the adapter\) found no LoRA pairs"):
        rplora_jax.unmerge(
            {"q": {"kernel": jnp.zeros((2, 2))}}, {"q/lora_A": jnp.ones((1, 2))}, scale=1.0
        )
