"""RefLoRA against a NumPy float64 transcription of the authors' code with AdamW, step by step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import AdamW
from reference_successors import Regression, reflora_factors, reflora_gradients
from test_lora_rite import from_flax, to_flax

import rplora_jax


def trajectories(problem, tx, lr, steps, *, eps, warmup=0, stacked=False, fallback=False):
    """Ours and the reference (the authors' preconditioning, then AdamW) from the problem's
    start, each on its own gradients: the largest relative difference after each step."""
    ref = [(a.copy(), b.copy()) for a, b in problem.init]
    adamw = AdamW(lr, weight_decay=1e-4)
    params = to_flax(ref, stacked)
    state = tx.init(params)
    update = jax.jit(tx.update)
    errors = []
    for k in range(steps):
        grads = problem.grads(ref)
        if k >= warmup:
            grads = reflora_gradients(ref, grads, eps, fallback)
        flat = adamw.step([x for pair in ref for x in pair], [g for pair in grads for g in pair])
        ref = list(zip(flat[::2], flat[1::2], strict=True))
        ours_grads = to_flax(problem.grads(from_flax(params, stacked)), stacked)
        updates, state = update(ours_grads, state, params)
        params = optax.apply_updates(params, updates)
        errors.append(
            max(
                np.abs(x - y).max() / max(np.abs(y).max(), 1e-3)
                for p, q in zip(from_flax(params, stacked), ref, strict=True)
                for x, y in zip(p, q, strict=True)
            )
        )
    return errors, ref


@pytest.mark.parametrize(
    ("problem_kw", "steps"),
    [
        (dict(seed=0, shapes=[(24, 16), (12, 20)], rank=4, b_zero=False), 35),
        (dict(seed=1, shapes=[(10, 14)], rank=2, b_zero=False), 30),
        (dict(seed=2, shapes=[(30, 24), (16, 40)], rank=8, b_zero=False), 30),
    ],
    ids=["r4", "r2", "r8"],
)
def test_trajectory_follows_the_authors_code(problem_kw, steps):
    problem = Regression(**problem_kw)
    eps = float(np.finfo(np.float32).eps)  # the authors': the factors' dtype's
    errors, ref = trajectories(problem, rplora_jax.reflora_adamw(1e-2), 1e-2, steps, eps=eps)
    assert (
        max(np.abs(a - a0).max() for (a, _), (a0, _) in zip(ref, problem.init, strict=True)) > 0.05
    )
    assert max(errors) < 1e-4, errors


def test_stacked_layers_and_warmup_from_b_zero():
    # The authors start RefLoRA after a warmup of plain AdamW steps: from b = 0 both agree.
    problem = Regression(seed=3, shapes=[(18, 10)] * 3, rank=4)
    eps = float(np.finfo(np.float32).eps)
    tx = rplora_jax.reflora_adamw(1e-2, warmup_steps=3)
    errors, _ = trajectories(problem, tx, 1e-2, 30, eps=eps, warmup=3, stacked=True)
    assert max(errors) < 1e-4, errors


def test_from_b_zero_without_warmup_the_library_starts_where_the_authors_code_stays():
    # b = 0: the authors' S is 0, so b's gradient is zeroed and nothing ever moves; the library
    # takes the identity for such a pair (a plain AdamW step) until b has full rank.
    problem = Regression(seed=4, shapes=[(12, 8)], rank=3)
    eps = float(np.finfo(np.float32).eps)
    ((a, b),) = problem.init
    s, _ = reflora_factors(a, b, eps)
    assert np.abs(s).max() == 0.0
    errors, ref = trajectories(
        problem, rplora_jax.reflora_adamw(1e-2), 1e-2, 30, eps=eps, fallback=True
    )
    assert max(errors) < 1e-4, errors
    assert np.abs(ref[0][1]).max() > 0.05  # b moved


def test_the_geometric_mean_balances_the_factors():
    # S solves S (a^T a) S = b b^T, and with P P^T = S the refactored pair a P, inv(P) b has
    # equal Grams: (a P)^T (a P) = P^T a^T a P and inv(P) b b^T inv(P)^T agree.
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((20, 4)), rng.standard_normal((4, 15))
    s, s_inv = reflora_factors(a.T, b.T, 0.0)
    np.testing.assert_allclose(s @ (a.T @ a) @ s, b @ b.T, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(s @ s_inv, np.eye(4), atol=1e-8)
    tx = rplora_jax.reflora_preconditioner(eps=0.0)
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    eye = {"lora_a": jnp.tile(jnp.eye(4, dtype=jnp.float32), (5, 1)), "lora_b": jnp.eye(4, 15)}
    got, _ = tx.update(eye, tx.init(params), params)
    np.testing.assert_allclose(got["lora_a"][:4], s_inv, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["lora_b"][:, :4], s, rtol=1e-4, atol=1e-5)


def test_interval_and_warmup_choose_the_preconditioned_steps():
    params = {
        "lora_a": jnp.asarray(np.random.default_rng(6).standard_normal((6, 2)), jnp.float32),
        "lora_b": jnp.asarray(np.random.default_rng(7).standard_normal((2, 5)), jnp.float32),
    }
    grads = jax.tree.map(jnp.ones_like, params)
    tx = rplora_jax.reflora_preconditioner(warmup_steps=2, interval=3)
    state, changed = tx.init(params), []
    for _ in range(9):
        updates, state = tx.update(grads, state, params)
        changed.append(bool(jnp.abs(updates["lora_a"] - 1).max() > 1e-3))
    assert changed == [False, False, True, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        rplora_jax.reflora_preconditioner(interval=0)


def test_other_leaves_pass_through_and_dtypes_are_kept():
    params = {
        "head": jnp.ones((3,)),
        "lora_a": jnp.ones((6, 2), jnp.bfloat16),
        "lora_b": jnp.full((2, 5), 0.1, jnp.bfloat16),
    }
    tx = rplora_jax.reflora_preconditioner()
    grads = jax.tree.map(lambda x: x * 0.5, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["head"], grads["head"])
    assert updates["lora_a"].dtype == jnp.bfloat16 and updates["lora_b"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(updates["lora_a"], np.float32)))


def test_ill_conditioned_but_regular_factors_are_refactored():
    # a^T a = diag(1, 1e-4) and b b^T = diag(1, 1e-3): both far from singular in float32, so S
    # is their geometric mean diag(1, sqrt(10)), not the identity fallback.
    a = jnp.array([[1.0, 0.0], [0.0, 1e-2], [0.0, 0.0]])
    b = jnp.array([[1.0, 0.0, 0.0], [0.0, 1e-3**0.5, 0.0]])
    params = {"lora_a": a, "lora_b": b}
    tx = rplora_jax.reflora_preconditioner(eps=0.0)
    ones = jax.tree.map(jnp.ones_like, params)
    got, _ = tx.update(ones, tx.init(params), params)
    np.testing.assert_allclose(got["lora_b"][:, 0], [1.0, 10**0.5], rtol=1e-4)
    np.testing.assert_allclose(got["lora_a"][0], [1.0, 10**-0.5], rtol=1e-4)
