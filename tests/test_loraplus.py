"""LoRA+ (``loraplus_adamw``) against a float64 NumPy transcription of AdamW, per leaf."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import AdamW

import rplora_jax
from rplora_jax.loraplus import loraplus_adamw, loraplus_labels

LR, RATIO, WD = 1e-2, 8.0, 1e-2


def rand(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _tree():
    """One plain pair, one stacked pair (3 layers) and a non-LoRA leaf."""
    return {
        "head": {"kernel": rand(0, (5, 3))},
        "q": {"lora_a": rand(1, (6, 2)), "lora_b": rand(2, (2, 5))},
        "stack": {"lora_a": rand(3, (3, 4, 2)), "lora_b": rand(4, (3, 2, 4))},
    }


def _grads(step, params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([rand(100 * step + i, x.shape) for i, x in enumerate(leaves)])


def _run(tx, params, steps):
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        updates, state = update(_grads(t, params), state, params)
        params = optax.apply_updates(params, updates)
    return params


B_LEAVES = {("q", "lora_b"), ("stack", "lora_b")}


def _paths(tree):
    return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_trajectory_matches_per_leaf_numpy_adamw():
    params = _tree()
    got = _run(loraplus_adamw(LR, RATIO, weight_decay=WD), params, 5)
    paths = _paths(params)
    ref = {p: AdamW(LR * RATIO if p in B_LEAVES else LR, weight_decay=WD) for p in paths}
    want = {
        p: np.asarray(x, np.float64) for p, x in zip(paths, jax.tree.leaves(params), strict=True)
    }
    for t in range(5):
        grads = dict(zip(paths, jax.tree.leaves(_grads(t, params)), strict=True))
        for p in paths:
            (want[p],) = ref[p].step([want[p]], [np.asarray(grads[p], np.float64)])
    for p, x in zip(paths, jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(x), want[p], rtol=1e-5, atol=1e-5, err_msg=str(p))
    # The b factors moved about RATIO times further than with plain AdamW.
    plain = _run(optax.adamw(LR, weight_decay=WD), params, 5)
    moved = lambda new: np.abs(np.asarray(new["q"]["lora_b"] - params["q"]["lora_b"])).mean()
    assert 0.5 * RATIO < moved(got) / moved(plain) < 1.5 * RATIO


def test_ratio_one_is_optax_adamw_exactly():
    params = _tree()
    got = _run(loraplus_adamw(LR, 1.0, weight_decay=WD), params, 4)
    want = _run(optax.adamw(LR, weight_decay=WD), params, 4)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)


def test_schedule_is_scaled_for_b():
    params = _tree()
    schedule = optax.linear_schedule(LR, 0.0, 4)
    got = _run(loraplus_adamw(schedule, RATIO, weight_decay=0.0), params, 3)
    paths = _paths(params)
    want = {
        p: np.asarray(x, np.float64) for p, x in zip(paths, jax.tree.leaves(params), strict=True)
    }
    ref = {p: AdamW(0.0, weight_decay=0.0) for p in paths}
    for t in range(3):
        grads = dict(zip(paths, jax.tree.leaves(_grads(t, params)), strict=True))
        for p in paths:
            ref[p].lr = LR * (1 - t / 4) * (RATIO if p in B_LEAVES else 1.0)
            (want[p],) = ref[p].step([want[p]], [np.asarray(grads[p], np.float64)])
    for p, x in zip(paths, jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(x), want[p], rtol=1e-5, atol=1e-5, err_msg=str(p))


def test_torch_layout_scales_lora_B():
    params = {"l": {"lora_A": {"weight": rand(0, (2, 6))}, "lora_B": {"weight": rand(1, (5, 2))}}}
    labels = loraplus_labels(params, rules=rplora_jax.PEFT)
    assert labels == {"l": {"lora_A": {"weight": "other"}, "lora_B": {"weight": "lora_b"}}}
    grads = jax.tree.map(jnp.ones_like, params)
    tx = loraplus_adamw(LR, RATIO, weight_decay=0.0, rules=rplora_jax.PEFT)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["l"]["lora_A"]["weight"], -LR, rtol=1e-5)
    np.testing.assert_allclose(updates["l"]["lora_B"]["weight"], -LR * RATIO, rtol=1e-5)


def test_weight_decay_mask_as_in_adamw():
    params = _tree()
    mask = jax.tree.map(lambda x: x.ndim == 2, params)  # no decay on the stacked pair
    got = _run(loraplus_adamw(LR, 1.0, weight_decay=0.5, mask=mask), params, 2)
    want = _run(optax.adamw(LR, weight_decay=0.5, mask=mask), params, 2)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(x, y)


def test_inject_hyperparams():
    params = _tree()
    tx = optax.inject_hyperparams(loraplus_adamw)(learning_rate=LR, lr_ratio=RATIO, weight_decay=WD)
    state = tx.init(params)
    assert float(state.hyperparams["lr_ratio"]) == RATIO
    got = _run(tx, params, 3)
    want = _run(loraplus_adamw(LR, RATIO, weight_decay=WD), params, 3)
    # Traced b1, b2... round differently: optax.adamw itself differs by 2e-6 under injection.
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)
    # A new ratio in the state changes the b factors' step without recompiling.
    update = jax.jit(tx.update)
    grads = jax.tree.map(jnp.ones_like, params)
    state.hyperparams["lr_ratio"] = jnp.asarray(2.0)
    updates, _ = update(grads, state, params)
    step_b = updates["q"]["lora_b"] + LR * 2.0 * WD * params["q"]["lora_b"]
    np.testing.assert_allclose(step_b, -LR * 2.0, rtol=1e-4)


def test_inside_freeze_base():
    params = _tree()
    tx = rplora_jax.freeze_base(loraplus_adamw(LR, RATIO, weight_decay=0.0))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["head"]["kernel"], 0.0)
    np.testing.assert_allclose(updates["q"]["lora_a"], -LR, rtol=1e-5)
    np.testing.assert_allclose(updates["stack"]["lora_b"], -LR * RATIO, rtol=1e-5)


def test_factor_without_partner_names_the_path():
    params = {"q": {"lora_a": rand(0, (4, 2))}, "k": {"lora_a": rand(1, (4, 2)), "lora_b": 0}}
    params["k"]["lora_b"] = rand(2, (2, 4))
    with pytest.raises(ValueError, match=r"'q/lora_a'.*no matching 'b'"):
        loraplus_adamw(LR).init(params)


def test_no_pairs_is_an_error_unless_allowed():
    params = {"kernel": rand(0, (3, 3))}
    with pytest.raises(ValueError, match="found no LoRA pairs"):
        loraplus_adamw(LR).init(params)
    tx = loraplus_adamw(LR, weight_decay=0.0, allow_no_pairs=True)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -LR, rtol=1e-5)
