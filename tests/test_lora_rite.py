"""LoRA-RITE against a NumPy float64 transcription of the authors' code, step by step; and both
successors (LoRA-RITE and RefLoRA) on PyTorch layout, under inject_hyperparams and on 8 devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_successors import LoraRite, Regression

import rplora_jax


def to_flax(pairs, stacked=False, dtype=np.float32):
    """Authors' ``(A (r, in), B (out, r))`` pairs as this library's Flax-layout tree."""
    if stacked:
        return {
            "lora_a": jnp.asarray(np.stack([a.T for a, _ in pairs]), dtype),
            "lora_b": jnp.asarray(np.stack([b.T for _, b in pairs]), dtype),
        }
    return {
        f"l{i}": {"lora_a": jnp.asarray(a.T, dtype), "lora_b": jnp.asarray(b.T, dtype)}
        for i, (a, b) in enumerate(pairs)
    }


def from_flax(tree, stacked=False):
    if stacked:
        a, b = (np.asarray(tree[k], np.float64) for k in ("lora_a", "lora_b"))
        return [(a[i].T, b[i].T) for i in range(len(a))]
    return [
        (
            np.asarray(tree[f"l{i}"]["lora_a"], np.float64).T,
            np.asarray(tree[f"l{i}"]["lora_b"], np.float64).T,
        )
        for i in range(len(tree))
    ]


def trajectories(problem, tx, reference, steps, stacked=False):
    """Both optimizers from the problem's start, each on its own gradients; the largest
    difference in the factors after each step, relative to the factors' size."""
    ref = [(a.copy(), b.copy()) for a, b in problem.init]
    params = to_flax(ref, stacked)
    state = tx.init(params)
    update = jax.jit(tx.update)
    errors = []
    for _ in range(steps):
        ref = reference.step(ref, problem.grads(ref))
        grads = to_flax(problem.grads(from_flax(params, stacked)), stacked)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        ours = from_flax(params, stacked)
        errors.append(
            max(
                np.abs(x - y).max() / max(np.abs(y).max(), 1e-3)
                for p, q in zip(ours, ref, strict=True)
                for x, y in zip(p, q, strict=True)
            )
        )
    return errors, from_flax(params, stacked), ref


CASES = {
    # name: (Regression kwargs, LoRA-RITE options, steps)
    "defaults-b0-r4": (dict(seed=0, shapes=[(24, 16), (12, 20)], rank=4), {}, 40),
    "random-start-r2": (dict(seed=1, shapes=[(10, 14)], rank=2, b_zero=False), {}, 35),
    "r8-escape-capping-decay": (
        dict(seed=2, shapes=[(30, 24), (16, 40)], rank=8),
        dict(escaped_mass=True, update_capping=0.05, weight_decay=0.01),
        35,
    ),
    # A quarter of the factor-steps skipped, and every step clipped (counted on the reference).
    "skipping-and-clipping": (
        dict(seed=3, shapes=[(20, 12), (20, 12)], rank=3, target=10.0, b_zero=False),
        dict(update_skipping=3.5, clip_unmagnified_grad=0.5),
        35,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_follows_the_authors_code(case):
    problem_kw, options, steps = CASES[case]
    problem = Regression(**problem_kw)
    lr = 1e-2
    reference = LoraRite(
        lr,
        weight_decay=options.get("weight_decay", 0.0),
        escape=options.get("escaped_mass", False),
        capping=options.get("update_capping", 0.0),
        skipping=options.get("update_skipping", 1.0),
        clip=options.get("clip_unmagnified_grad", 1.0),
    )
    errors, _, ref = trajectories(problem, rplora_jax.lora_rite(lr, **options), reference, steps)
    moved = max(np.abs(a - a0).max() for (a, _), (a0, _) in zip(ref, problem.init, strict=True))
    assert moved > 1e-2  # the trajectory goes somewhere
    assert max(errors) < 3e-5, errors  # float32 against float64: 5e-6 at most, measured


def test_stacked_layers_are_pairs_of_their_own():
    problem = Regression(seed=4, shapes=[(18, 10)] * 3, rank=4)
    errors, _, _ = trajectories(
        problem, rplora_jax.lora_rite(1e-2), LoraRite(1e-2), 30, stacked=True
    )
    assert max(errors) < 3e-5, errors  # float32 against float64: 5e-6 at most, measured


def test_the_first_step_from_b_zero():
    # b = 0: pinv(R_b) = 0, so a's unmagnified gradient, moments and step are all zero at first,
    # and b's step is finite; the reference gives the same.
    problem = Regression(seed=5, shapes=[(8, 6)], rank=2)
    tx = rplora_jax.lora_rite(1e-2)
    params = to_flax(problem.init)
    grads = to_flax(problem.grads(problem.init))
    updates, state = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["l0"]["lora_a"]).max()) == 0.0
    assert (
        np.all(np.isfinite(updates["l0"]["lora_b"]))
        and float(jnp.abs(updates["l0"]["lora_b"]).max()) > 0
    )
    ((a, b),) = LoraRite(1e-2).step(problem.init, problem.grads(problem.init))
    np.testing.assert_array_equal(a, problem.init[0][0])
    np.testing.assert_allclose(
        np.asarray(updates["l0"]["lora_b"]).T, b - problem.init[0][1], rtol=1e-5, atol=1e-8
    )
    assert int(state[0].count) == 1


def test_the_update_of_w_is_invariant_to_the_factorisation():
    # a -> a @ R, b -> inv(R) @ b is the same model; LoRA-RITE moves W = a @ b the same way.
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((12, 3)), rng.standard_normal((3, 9))
    r = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    target = rng.standard_normal((12, 9))
    loss = lambda p: 0.5 * jnp.sum((p["lora_a"] @ p["lora_b"] - target) ** 2)

    def run(a, b):
        params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
        tx = rplora_jax.lora_rite(3e-3, update_skipping=0.0, clip_unmagnified_grad=0.0)
        state, products = tx.init(params), []
        for _ in range(10):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
            products.append(np.asarray(params["lora_a"] @ params["lora_b"], np.float64))
        return products

    first, second = run(a, b), run(a @ r, np.linalg.inv(r) @ b)
    assert np.abs(first[-1] - a @ b).max() > 0.05  # W moved
    for w1, w2 in zip(first, second, strict=True):
        np.testing.assert_allclose(w1, w2, rtol=2e-4, atol=2e-4)

    # Scaled AdamW has no such property: the same two starts part ways.
    def adam(a, b):
        params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
        tx = optax.adamw(3e-3)
        state = tx.init(params)
        for _ in range(10):
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            params = optax.apply_updates(params, updates)
        return np.asarray(params["lora_a"] @ params["lora_b"])

    assert np.abs(adam(a, b) - adam(a @ r, np.linalg.inv(r) @ b)).max() > 1e-2


def test_only_factors_are_updated():
    # Another leaf has no LoRA-RITE rule: an error naming it, unless it is frozen.
    params = {
        "head": jnp.ones((3,)),
        "q": {"kernel": jnp.ones((4, 3)), "lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))},
    }
    with pytest.raises(ValueError, match=r"LoRA factors only, .*: \['head', 'q/kernel'\]"):
        rplora_jax.lora_rite(1e-2).init(params)
    tx = rplora_jax.freeze_base(rplora_jax.lora_rite(1e-2))
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["head"]).max()) == 0.0
    assert float(jnp.abs(updates["q"]["kernel"]).max()) == 0.0
    assert float(jnp.abs(updates["q"]["lora_b"]).max()) > 0.0


def test_dtypes_are_kept_and_the_state_is_float32():
    params = {
        "lora_a": jnp.ones((6, 2), jnp.bfloat16),
        "lora_b": jnp.full((2, 5), 0.1, jnp.bfloat16),
    }
    tx = rplora_jax.lora_rite(1e-2)
    state = tx.init(params)
    updates, state = tx.update(jax.tree.map(lambda x: x * 0.01, params), state, params)
    assert updates["lora_a"].dtype == jnp.bfloat16 and updates["lora_b"].dtype == jnp.bfloat16
    inner = state[0]
    assert inner.mu["lora_a"].dtype == jnp.float32 and inner.nu["lora_a"].shape == (2, 2)
    assert np.all(np.isfinite(np.asarray(updates["lora_a"], np.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora_rite", "reflora"])
@pytest.mark.parametrize(
    "case",
    [
        "features/axis_name",
        "features/specs",
        "stacked/specs",
        "einsum/axis_name",
        "einsum/specs",
        "jit",
        "jit-explicit",
        "jit-stacked",
        "jit-explicit-stacked",
        "jit-explicit-einsum",
    ],
)
def test_sharded_steps_equal_the_single_device_ones(successor_report, name, case):
    # 8 virtual devices: inside shard_map every sum over a factor's features (and, for the
    # global norm, over layers split across devices) is completed; under jax.jit on sharded
    # arrays (Auto or Explicit axes) the updates and the state keep the factors' sharding.
    got = successor_report[f"{name}/{case}"]
    assert "error" not in got, got
    assert got["rel"] < 2e-5, got
    assert got.get("kept", True)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: rplora_jax.lora_rite(1e-2, **kw),
        lambda **kw: rplora_jax.reflora_adamw(1e-2, **kw),
    ],
    ids=["lora_rite", "reflora_adamw"],
)
def test_pytorch_layout_takes_the_same_steps(make):
    # PEFT's A: (r, in), B: (out, r) under rules=PEFT: the transposes of the Flax-layout steps.
    problem = Regression(seed=7, shapes=[(9, 7)], rank=3, b_zero=False)
    ((a, b),) = problem.init
    flax = {"lora_a": jnp.asarray(a.T, jnp.float32), "lora_b": jnp.asarray(b.T, jnp.float32)}
    torch = {
        "q.lora_A.weight": jnp.asarray(a, jnp.float32),
        "q.lora_B.weight": jnp.asarray(b, jnp.float32),
    }
    tx_flax, tx_torch = make(), make(rules=rplora_jax.PEFT)
    s_flax, s_torch = tx_flax.init(flax), tx_torch.init(torch)
    for _ in range(5):
        pairs = [
            (
                np.asarray(torch["q.lora_A.weight"], np.float64),
                np.asarray(torch["q.lora_B.weight"], np.float64),
            )
        ]
        ((g_a, g_b),) = problem.grads(pairs)
        g_a, g_b = g_a.astype(np.float32), g_b.astype(np.float32)
        u_flax, s_flax = tx_flax.update({"lora_a": g_a.T, "lora_b": g_b.T}, s_flax, flax)
        u_torch, s_torch = tx_torch.update(
            {"q.lora_A.weight": g_a, "q.lora_B.weight": g_b}, s_torch, torch
        )
        flax, torch = optax.apply_updates(flax, u_flax), optax.apply_updates(torch, u_torch)
        np.testing.assert_allclose(torch["q.lora_A.weight"], flax["lora_a"].T, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(torch["q.lora_B.weight"], flax["lora_b"].T, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "make", [rplora_jax.lora_rite, rplora_jax.reflora_adamw], ids=["lora_rite", "reflora_adamw"]
)
def test_inject_hyperparams_schedules_the_rate(make):
    # Every numeric argument becomes a traced hyperparameter; the steps must not change.
    problem = Regression(seed=8, shapes=[(9, 7)], rank=3, b_zero=False)
    params = to_flax(problem.init)
    grads = to_flax(problem.grads(problem.init))
    plain, injected = make(1e-2), optax.inject_hyperparams(make)(learning_rate=1e-2)
    s1, s2 = plain.init(params), injected.init(params)
    for _ in range(3):
        u1, s1 = jax.jit(plain.update)(grads, s1, params)
        u2, s2 = jax.jit(injected.update)(grads, s2, params)
        for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)  # rounding only


def test_bad_hyperparameters_are_named():
    for kw, message in (({"b1": 1.0}, "b1 must lie in"), ({"b2": -0.1}, "b2 must lie in"),
                        ({"eps": -1.0}, "eps must be non-negative")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            rplora_jax.lora_rite(1e-2, **kw)
