"""Pairing rules: which leaves form LoRA pairs, for the layouts of the JAX LoRA ecosystem.

Only jax is needed, except by the nnx test, which imports flax itself.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import pytest

import rplora_jax
from rplora_jax.pairing import PairingRule, names


def pairs_of(params, **kw):
    """(a_path, b_path, layout, rank) of each pair; also checks that no axis was read as stacked."""
    pairs = rplora_jax.find_lora_pairs(params, **kw)
    assert all(p.stacked_shape == () for p in pairs), pairs
    return [(p.a_path, p.b_path, p.layout, p.rank) for p in pairs]


def rules_of(params, **kw):
    return [p.rule for p in rplora_jax.find_lora_pairs(params, **kw)]


def test_nnx_lora_and_lora_linear():
    nnx = pytest.importorskip("flax.nnx")
    model = nnx.Dict(
        lin=nnx.LoRALinear(8, 4, lora_rank=2, rngs=nnx.Rngs(0)),
        lora=nnx.LoRA(8, 3, 4, rngs=nnx.Rngs(1)),
    )
    state = nnx.to_pure_dict(nnx.state(model))
    assert pairs_of(state) == [
        ("lin/lora/lora_a", "lin/lora/lora_b", "flax", 2),
        ("lora/lora_a", "lora/lora_b", "flax", 3),
    ]
    assert rules_of(state) == [rplora_jax.NNX.name] * 2
    # Unwrapped nnx.State (Variables) pairs the same way.
    assert pairs_of(nnx.state(model, nnx.LoRAParam)) == pairs_of(state)


def test_gemma_and_qwix_layouts():
    params = {
        "attn": {
            "q": {"w": jnp.ones((8, 8)), "lora": {"a": jnp.ones((8, 2)), "b": jnp.ones((2, 8))}}
        },
        "mlp": {
            "kernel": jnp.ones((8, 16)),
            "kernel_lora_a": jnp.ones((8, 4)),
            "kernel_lora_b": jnp.ones((4, 16)),
        },
    }
    assert pairs_of(params) == [
        ("attn/q/lora/a", "attn/q/lora/b", "flax", 2),
        ("mlp/kernel_lora_a", "mlp/kernel_lora_b", "flax", 4),
    ]
    assert rules_of(params) == [rplora_jax.GEMMA.name, rplora_jax.QWIX.name]


def test_unrelated_a_b_leaves_are_not_factors_by_default():
    params = {"norm": {"a": jnp.ones((4, 2)), "b": jnp.ones((2,))}}
    assert pairs_of(params) == []


def test_name_pair_and_callable_rules():
    params = {"blk": {"down": jnp.ones((8, 2)), "up": jnp.ones((2, 5))}}
    assert pairs_of(params, rules=("down", "up")) == [("blk/down", "blk/up", "flax", 2)]

    def rule(tokens):
        if tokens[-1] in ("down", "up"):
            return ("a" if tokens[-1] == "down" else "b"), tokens[:-1]
        return None

    assert pairs_of(params, rules=rule) == [("blk/down", "blk/up", "flax", 2)]
    torch_rule = names("down", "up", layout="torch")
    params_t = {"blk": {"down": jnp.ones((2, 8)), "up": jnp.ones((5, 2))}}
    assert pairs_of(params_t, rules=torch_rule) == [("blk/down", "blk/up", "torch", 2)]


def test_several_rules_in_order():
    params = {
        "x": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))},
        "y": {"lora_A": jnp.ones((3, 4)), "lora_B": jnp.ones((4, 3))},
    }
    got = pairs_of(params, rules=[*rplora_jax.DEFAULT_RULES, rplora_jax.PEFT])
    assert got == [("x/lora_a", "x/lora_b", "flax", 2), ("y/lora_A", "y/lora_B", "torch", 3)]
    assert rules_of(params, rules=[*rplora_jax.DEFAULT_RULES, rplora_jax.PEFT]) == [
        rplora_jax.NNX.name,
        rplora_jax.PEFT.name,
    ]
    # Without PEFT the torch-named pair is not found at all.
    assert pairs_of(params) == [("x/lora_a", "x/lora_b", "flax", 2)]


def test_two_leaves_claiming_the_same_role():
    params = {"x": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 4))}}
    rule = PairingRule(lambda t: ("a", "g") if t[-1].startswith("lora") else None)
    with pytest.raises(ValueError, match="'x/lora_a' and 'x/lora_b'"):
        rplora_jax.find_lora_pairs(params, rules=rule)


def test_bad_rules_argument():
    with pytest.raises(TypeError, match="rules must be"):
        rplora_jax.find_lora_pairs({}, rules=[3])
    with pytest.raises(ValueError, match="'flax' or 'torch'"):
        PairingRule(lambda t: None, layout="jax")
    # A lone string used to be read as one rule per character ("got 'l'").
    with pytest.raises(TypeError, match=r"rules='lora_a' is one name: .*\('lora_a', '<b name>'\)"):
        rplora_jax.find_lora_pairs({}, rules="lora_a")


def test_empty_factors_are_refused():
    # Rank 0, which LoRAConfig refuses too: a pair with nothing to train.
    params = {"lora_a": jnp.ones((4, 0)), "lora_b": jnp.ones((0, 4))}
    with pytest.raises(ValueError, match=r"factor 'a' at 'lora_a' is empty: shape \(4, 0\)"):
        rplora_jax.find_lora_pairs(params)


def test_torch_rank_mismatch_message():
    params = {"lora_A": jnp.ones((3, 8)), "lora_B": jnp.ones((6, 2))}
    with pytest.raises(ValueError, match=r"A: \(\*stack, r, \*in\).*r = B.shape\[-1\] = 2"):
        rplora_jax.find_lora_pairs(params, rules=rplora_jax.PEFT)


def test_kernel_settles_shapes_that_read_both_as_stacked_and_multi_axis():
    # One layer with input axes (4, 16), output axes (4, 8), rank 4; its factors also read as 4
    # stacked layers of a (16, 4) / (4, 8) pair. The kernel next to them says which.
    a, b = jnp.zeros((4, 16, 4)), jnp.zeros((4, 4, 8))
    one_layer = {"lora_a": a, "lora_b": b, "kernel": jnp.zeros((4, 16, 4, 8))}
    stacked = {"lora_a": a, "lora_b": b, "kernel": jnp.zeros((4, 16, 8))}
    assert rplora_jax.find_lora_pairs(one_layer)[0].stacked_shape == ()
    assert rplora_jax.find_lora_pairs(stacked)[0].stacked_shape == (4,)
    # Without a kernel (an optimizer that sees only the factors) the stacked reading is taken;
    # stacked_axes=0 gives the other.
    factors = {"lora_a": a, "lora_b": b}
    assert rplora_jax.find_lora_pairs(factors)[0].stacked_shape == (4,)
    assert rplora_jax.find_lora_pairs(factors, stacked_axes=0)[0].stacked_shape == ()
    merged = rplora_jax.merge({"params": {"d": one_layer}}, scale=1.0)
    assert merged["params"]["d"]["kernel"].shape == (4, 16, 4, 8)


def test_a_rule_returning_something_else_is_named():
    params = {"layer": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}}
    for result in (lambda t: ("a", list(t)), lambda t: "a", lambda t: ("c", t)):
        rule = PairingRule(lambda t, f=result: f(t[:-1]) if t[-1] == "lora_a" else None)
        with pytest.raises(ValueError, match=r"returned .* for 'layer/lora_a'; a rule returns"):
            rplora_jax.find_lora_pairs(params, rules=rule)


def test_tuple_keys_of_flatten_dict_are_paths():
    from flax import traverse_util

    nested = {"params": {"fc": {"kernel": jnp.zeros((6, 5)), "lora_a": jnp.ones((6, 2)),
                                "lora_b": jnp.ones((2, 5))}}}  # fmt: skip
    (pair,) = rplora_jax.find_lora_pairs(traverse_util.flatten_dict(nested))
    assert (pair.a_path, pair.b_path, pair.rank) == ("params/fc/lora_a", "params/fc/lora_b", 2)


def test_factors_in_the_other_layout_warn_on_square_layers():
    # PyTorch-layout A: (2, 16), B: (16, 2) read as Flax layout pair up with "rank" 16.
    torch_layout = {"q": {"lora_down": jnp.ones((2, 16)), "lora_up": jnp.ones((16, 2))}}
    with pytest.warns(UserWarning, match=r"reads as rank 16, more than its 2 input and 2 output"):
        rplora_jax.find_lora_pairs(torch_layout, rules=("lora_down", "lora_up"))
    head = {"cls": {"lora_a": jnp.ones((768, 8)), "lora_b": jnp.ones((8, 2))}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank 8 > 2 outputs but < 768 inputs: a real LoRA
        assert rplora_jax.find_lora_pairs(head)[0].rank == 8
