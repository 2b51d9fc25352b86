"""riemannian_preconditioner, scaled_sgd and scaled_adamw against the NumPy transcription.

Only jax and optax are needed, except by the flax interop test, which imports flax itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import AdamW, factorisation_grads, precondition_flax, precondition_torch

import rplora_jax
from rplora_jax import _linalg, riemannian_preconditioner, scaled_adamw, scaled_sgd
from rplora_jax import preconditioner as P
from rplora_jax._grouping import DEFAULT, Tuning


def rand(seed, shape, dtype=jnp.float32, scale=1.0):
    # NumPy's generator, not jax.random: that compiles a sampler for every new shape (about a
    # second of CPU each, most of this file's run time when it was used).
    x = scale * np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray(x.astype(np.float32).astype(dtype))


def precondition(params, grads, reg=1e-3, tuning=DEFAULT, **kw):
    """One update of the preconditioner, jitted (eagerly it is several times slower); ``tuning``
    sets its performance choices."""
    tx = P._transformation(reg, tuning=tuning, **kw)

    @jax.jit
    def update(grads, params):
        return tx.update(grads, tx.init(params), params)[0]

    return update(grads, params)


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("reg", [0.0, 1e-3, 1.0])
def test_one_step_matches_numpy(reg):
    params = {
        "q": {"kernel": rand(0, (6, 5)), "lora_a": rand(1, (6, 3)), "lora_b": rand(2, (3, 5))}
    }
    grads = jax.tree.map(lambda p: rand(7, p.shape), params)
    updates = precondition(params, grads, reg)
    want_a, want_b = precondition_flax(
        grads["q"]["lora_a"],
        grads["q"]["lora_b"],
        params["q"]["lora_a"],
        params["q"]["lora_b"],
        reg,
    )
    np.testing.assert_allclose(updates["q"]["lora_a"], want_a, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(updates["q"]["lora_b"], want_b, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(updates["q"]["kernel"], grads["q"]["kernel"])


@pytest.mark.usefixtures("strict_promotion")
def test_stacked_layers_are_independent():
    params = {"lora_a": rand(1, (4, 7, 3)), "lora_b": rand(2, (4, 3, 5))}
    grads = {"lora_a": rand(3, (4, 7, 3)), "lora_b": rand(4, (4, 3, 5))}
    updates = precondition(params, grads, 1e-2)
    want_a, want_b = precondition_flax(
        grads["lora_a"], grads["lora_b"], params["lora_a"], params["lora_b"], 1e-2, stacked=1
    )
    np.testing.assert_allclose(updates["lora_a"], want_a, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(updates["lora_b"], want_b, rtol=2e-5, atol=1e-6)
    (pair,) = rplora_jax.find_lora_pairs(params)
    assert pair.stacked_shape == (4,) and pair.rank == 3


def check_flax_pair(a_shape, b_shape, stacked, reg, *, rtol, tuning=DEFAULT):
    """Preconditions one Flax-layout pair of random factors and gradients, checks it against the
    NumPy reference, and returns ``(params, grads, want_a, want_b)``."""
    params = {"lora_a": rand(1, a_shape), "lora_b": rand(2, b_shape)}
    grads = {"lora_a": rand(3, a_shape), "lora_b": rand(4, b_shape)}
    updates = precondition(params, grads, reg, tuning)
    want_a, want_b = precondition_flax(
        grads["lora_a"], grads["lora_b"], params["lora_a"], params["lora_b"], reg, stacked
    )
    np.testing.assert_allclose(updates["lora_a"], want_a, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(updates["lora_b"], want_b, rtol=rtol, atol=1e-6)
    return params, grads, want_a, want_b


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "stacked"),
    [
        ((3, 4, 2), (2, 10), 0),  # einsum: a over (heads, head_dim)
        ((10, 2), (2, 3, 4), 0),  # einsum: b over (heads, head_dim)
        ((5, 3, 4, 2), (5, 2, 3, 4), 1),  # stacked layers of einsum LoRA
    ],
)
def test_multi_axis_factors(a_shape, b_shape, stacked):
    check_flax_pair(a_shape, b_shape, stacked, 1e-2, rtol=5e-5)


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("stacked", [0, 1])
def test_large_rank_uses_the_matmul_path(stacked):
    lead = (2,) * stacked
    params, grads, want_a, want_b = check_flax_pair(
        (*lead, 50, 40), (*lead, 40, 60), stacked, 1e-1, rtol=1e-4
    )
    torch_params = {
        "lora_A": np.swapaxes(params["lora_a"], -1, -2),
        "lora_B": np.swapaxes(params["lora_b"], -1, -2),
    }
    torch_grads = {
        "lora_A": np.swapaxes(grads["lora_a"], -1, -2),
        "lora_B": np.swapaxes(grads["lora_b"], -1, -2),
    }
    updates = precondition(torch_params, torch_grads, 1e-1, rules=rplora_jax.PEFT)
    np.testing.assert_allclose(np.swapaxes(updates["lora_A"], -1, -2), want_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.swapaxes(updates["lora_B"], -1, -2), want_b, rtol=1e-4, atol=1e-6)


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize(
    "tuning",
    [
        Tuning(unroll_min_size=0),  # unrolled, but a dot for the rank-first b
        Tuning(unroll_min_size=0, rank_first_apply="unrolled"),  # unrolled on both sides
        Tuning(unroll_min_size=1 << 30),  # summed over the rank
        Tuning(unroll_max_rank=0),  # a dot
        Tuning(unroll_min_size=0, large_grams="stacked"),  # stacked Grams of large factors
        Tuning(inverse="cholesky"),  # the inverse of other backends than the CPU
        Tuning(unroll_min_size=0, rank_first_apply="unrolled", large_grams="stacked"),
    ],
    ids=["unrolled", "unrolled-both", "summed", "matmul", "stacked-grams", "cholesky", "all-other"],
)
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "stacked"),
    [((70, 3), (3, 90), 0), ((2, 6, 5, 4), (2, 4, 30), 1)],
)
def test_every_form_matches_numpy(tuning, a_shape, b_shape, stacked):
    # Which forms the update takes depends on the backend, the rank and the gradient's size;
    # all must give the same result.
    check_flax_pair(a_shape, b_shape, stacked, 1e-2, rtol=5e-5, tuning=tuning)


@pytest.mark.parametrize("stacked", [0, 1])
def test_unrolled_form_with_the_rank_axis_first(stacked):
    # The unrolled apply of rank-first gradients, which are otherwise dots, directly against
    # NumPy (inv is symmetric, like every inverse).
    lead = (2,) * stacked
    g = rand(0, (*lead, 3, 7))
    m = rand(1, (*lead, 3, 3))
    inv = m + jnp.swapaxes(m, -1, -2)
    got = _linalg.apply_unrolled(g, inv, rank_axis=stacked, stacked=stacked)
    want = np.einsum("...jk,...kc->...jc", np.asarray(inv, np.float64), np.asarray(g, np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("strict_promotion")
def test_many_pairs_of_mixed_kinds_are_each_preconditioned():
    # Pairs are batched by kind (shapes, dtypes, stacking) in chunks: interleaved kinds, several
    # chunks of one kind and a partial chunk must each get their own Grams. With these sizes the
    # first kind takes the summed apply and the others the unrolled one.
    tuning = DEFAULT._replace(chunk=2, unrolled_chunk=3, unroll_min_size=20)
    shapes = [((6, 2), (2, 5), 0), ((4, 3, 2), (4, 2, 5), 1), ((7, 3), (3, 4), 0)]
    params, grads, kinds = {}, {}, {}
    for i in range(11):
        a_shape, b_shape, stacked = shapes[i % 3]
        name = f"layer_{i}"
        kinds[name] = stacked
        params[name] = {"lora_a": rand(4 * i, a_shape), "lora_b": rand(4 * i + 1, b_shape)}
        grads[name] = {"lora_a": rand(4 * i + 2, a_shape), "lora_b": rand(4 * i + 3, b_shape)}
    params["layer_1"]["lora_b"] = jnp.zeros((4, 2, 5))  # a zero factor among nonzero ones
    updates = precondition(params, grads, 1e-2, tuning)
    for name, stacked in kinds.items():
        p, g = params[name], grads[name]
        want_a, want_b = precondition_flax(
            g["lora_a"], g["lora_b"], p["lora_a"], p["lora_b"], 1e-2, stacked
        )
        np.testing.assert_allclose(updates[name]["lora_a"], want_a, rtol=5e-5, atol=1e-6)
        np.testing.assert_allclose(updates[name]["lora_b"], want_b, rtol=5e-5, atol=1e-6)


def test_explicit_stacked_axes_overrides_inference():
    # r == number of layers makes both readings valid; the inferred one is the stacked one.
    params = {"lora_a": rand(1, (4, 6, 4)), "lora_b": rand(2, (4, 4, 6))}
    grads = {"lora_a": rand(3, (4, 6, 4)), "lora_b": rand(4, (4, 4, 6))}
    assert rplora_jax.find_lora_pairs(params)[0].stacked_shape == (4,)
    updates = precondition(params, grads, 1e-2, stacked_axes=0)
    want_a, want_b = precondition_flax(
        grads["lora_a"], grads["lora_b"], params["lora_a"], params["lora_b"], 1e-2, 0
    )
    np.testing.assert_allclose(updates["lora_a"], want_a, rtol=5e-5, atol=1e-6)
    np.testing.assert_allclose(updates["lora_b"], want_b, rtol=5e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stacked_axes=2 does not fit"):
        rplora_jax.find_lora_pairs(params, stacked_axes=2)


@pytest.mark.usefixtures("strict_promotion")
def test_pytorch_layout_peft_names():
    # A PEFT checkpoint kept in PyTorch layout: lora_A.weight (r, in), lora_B.weight (out, r).
    params = {
        "layers.0.q_proj.lora_A.weight": rand(1, (3, 8)),
        "layers.0.q_proj.lora_B.weight": rand(2, (6, 3)),
    }
    grads = {k: rand(i + 5, v.shape) for i, (k, v) in enumerate(params.items())}
    updates = precondition(params, grads, 1e-3, rules=rplora_jax.PEFT)
    want_A, want_B = precondition_torch(
        grads["layers.0.q_proj.lora_A.weight"],
        grads["layers.0.q_proj.lora_B.weight"],
        params["layers.0.q_proj.lora_A.weight"],
        params["layers.0.q_proj.lora_B.weight"],
        1e-3,
    )
    np.testing.assert_allclose(updates["layers.0.q_proj.lora_A.weight"], want_A, rtol=2e-5)
    np.testing.assert_allclose(updates["layers.0.q_proj.lora_B.weight"], want_B, rtol=2e-5)
    (pair,) = rplora_jax.find_lora_pairs(params, rules=rplora_jax.PEFT)
    assert pair.layout == "torch" and pair.rank == 3
    assert pair.a_path == "layers/0/q_proj/lora_A/weight"


def test_lorax_swapped_names():
    # lorax: W + b @ a with b: (in, r) zero-initialised and a: (r, out).
    params = {
        "dense": {"kernel": {"w": rand(0, (8, 6)), "b": rand(1, (8, 2)), "a": rand(2, (2, 6))}}
    }
    grads = jax.tree.map(lambda p: rand(9, p.shape), params)
    updates = precondition(params, grads, 1e-3, rules=rplora_jax.LORAX)
    k, g = params["dense"]["kernel"], grads["dense"]["kernel"]
    want_in, want_out = precondition_flax(g["b"], g["a"], k["b"], k["a"], 1e-3)
    np.testing.assert_allclose(updates["dense"]["kernel"]["b"], want_in, rtol=2e-5)
    np.testing.assert_allclose(updates["dense"]["kernel"]["a"], want_out, rtol=2e-5)
    np.testing.assert_array_equal(updates["dense"]["kernel"]["w"], g["w"])


def _factorisation_problem():
    # Started near the solution: from a random start plain scaled GD may diverge at this step.
    rng = np.random.default_rng(0)
    left, right = rng.standard_normal((12, 3)), rng.standard_normal((3, 10))
    a0 = left + 0.3 * rng.standard_normal((12, 3))
    b0 = right + 0.3 * rng.standard_normal((3, 10))
    return left @ right, a0, b0


# A non-LoRA leaf `w` (starting at 0) trained alongside the pair with this constant gradient: the
# preconditioner must pass it through, so only the base optimizer moves it.
_W_GRAD = np.linspace(-1.0, 1.0, 10)


def _run_jax(tx, target, a0, b0, steps):
    """`steps` updates of `tx` on the factorisation problem, as one jitted scan; (a, b, w)."""
    params = {
        "lora_a": jnp.asarray(a0, jnp.float32),
        "lora_b": jnp.asarray(b0, jnp.float32),
        "w": jnp.zeros(_W_GRAD.shape, jnp.float32),
    }
    t = jnp.asarray(target, jnp.float32)
    g_w = jnp.asarray(_W_GRAD, jnp.float32)

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            g_a, g_b = factorisation_grads(params["lora_a"], params["lora_b"], t)
            grads = {"lora_a": g_a, "lora_b": g_b, "w": g_w}
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
        return params

    out = run(params)
    return tuple(np.asarray(out[k]) for k in ("lora_a", "lora_b", "w"))


def test_scaled_sgd_trajectory_matches_numpy():
    target, a, b = _factorisation_problem()
    got_a, got_b, got_w = _run_jax(scaled_sgd(0.3, reg=1e-4), target, a, b, 60)
    w = np.zeros_like(_W_GRAD)
    for _ in range(60):
        g_a, g_b = precondition_flax(*factorisation_grads(a, b, target), a, b, 1e-4)
        a, b, w = a - 0.3 * g_a, b - 0.3 * g_b, w - 0.3 * _W_GRAD
    np.testing.assert_allclose(got_a @ got_b, a @ b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_a, a, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got_b, b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got_w, w, rtol=1e-5)
    # Scaled GD solves this well-posed factorisation; the trajectory is not a trivial one.
    assert np.linalg.norm(a @ b - target) < 1e-6 * np.linalg.norm(target)


def test_scaled_adamw_trajectory_matches_numpy():
    target, a, b = _factorisation_problem()
    got_a, got_b, got_w = _run_jax(scaled_adamw(1e-2, reg=1e-3), target, a, b, 60)
    opt = AdamW(1e-2)
    w = np.zeros_like(_W_GRAD)
    for _ in range(60):
        g = precondition_flax(*factorisation_grads(a, b, target), a, b, 1e-3)
        a, b, w = opt.step([a, b, w], [*g, _W_GRAD])
    np.testing.assert_allclose(got_a, a, rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(got_b, b, rtol=1e-3, atol=2e-5)
    np.testing.assert_allclose(got_w, w, rtol=5e-5)  # float32 sums of 60 steps: 7e-6 measured


def test_scaled_adamw_is_the_chain():
    target, a, b = _factorisation_problem()
    chain = optax.chain(riemannian_preconditioner(1e-3), optax.adamw(1e-2, weight_decay=1e-4))
    got = _run_jax(scaled_adamw(1e-2, reg=1e-3), target, a, b, 10)
    want = _run_jax(chain, target, a, b, 10)
    for got_x, want_x in zip(got, want, strict=True):
        np.testing.assert_array_equal(got_x, want_x)


def test_learning_rate_schedule():
    target, a, b = _factorisation_problem()
    schedule = optax.linear_schedule(0.3, 0.0, 20)
    got_a, got_b, got_w = _run_jax(scaled_sgd(schedule, reg=1e-4), target, a, b, 20)
    w = np.zeros_like(_W_GRAD)
    for t in range(20):
        g_a, g_b = precondition_flax(*factorisation_grads(a, b, target), a, b, 1e-4)
        lr = 0.3 * (1 - t / 20)
        a, b, w = a - lr * g_a, b - lr * g_b, w - lr * _W_GRAD
    np.testing.assert_allclose(got_a, a, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got_b, b, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got_w, w, rtol=1e-5)


def _lora_tree():
    return {
        "base": {"kernel": rand(0, (6, 5))},
        "q": {"lora_a": rand(1, (6, 2)), "lora_b": rand(2, (2, 5))},
    }


def test_inside_partition_with_frozen_base():
    params = _lora_tree()
    grads = jax.tree.map(lambda p: rand(5, p.shape), params)
    labels = {"base": {"kernel": "frozen"}, "q": {"lora_a": "lora", "lora_b": "lora"}}
    tx = optax.partition({"lora": scaled_sgd(1.0, reg=1e-3), "frozen": optax.set_to_zero()}, labels)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["base"]["kernel"], 0.0)
    want_a, want_b = precondition_flax(
        grads["q"]["lora_a"],
        grads["q"]["lora_b"],
        params["q"]["lora_a"],
        params["q"]["lora_b"],
        1e-3,
    )
    np.testing.assert_allclose(updates["q"]["lora_a"], -want_a, rtol=2e-5)
    np.testing.assert_allclose(updates["q"]["lora_b"], -want_b, rtol=2e-5)


def test_pair_split_across_partition_is_an_error():
    params = _lora_tree()
    labels = {"base": {"kernel": "frozen"}, "q": {"lora_a": "lora", "lora_b": "frozen"}}
    tx = optax.partition(
        {"lora": riemannian_preconditioner(), "frozen": optax.set_to_zero()}, labels
    )
    with pytest.raises(ValueError, match=r"'q/lora_a'.*masked at 'q/lora_b'.*partition"):
        tx.init(params)


def test_under_multisteps_preconditions_the_mean_gradient():
    params = _lora_tree()
    g1 = jax.tree.map(lambda p: rand(5, p.shape), params)
    g2 = jax.tree.map(lambda p: rand(6, p.shape), params)
    tx = optax.MultiSteps(scaled_sgd(1.0, reg=1e-3), every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u1, state = update(g1, state, params)
    u2, state = update(g2, state, params)
    for leaf in jax.tree.leaves(u1):
        np.testing.assert_array_equal(leaf, 0.0)
    mean = jax.tree.map(lambda x, y: (x + y) / 2, g1, g2)
    want_a, want_b = precondition_flax(
        mean["q"]["lora_a"], mean["q"]["lora_b"], params["q"]["lora_a"], params["q"]["lora_b"], 1e-3
    )
    np.testing.assert_allclose(u2["q"]["lora_a"], -want_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(u2["q"]["lora_b"], -want_b, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(u2["base"]["kernel"], -mean["base"]["kernel"], rtol=1e-6, atol=1e-7)


def test_under_apply_if_finite():
    params = _lora_tree()
    tx = optax.apply_if_finite(scaled_sgd(1.0), max_consecutive_errors=3)
    state = tx.init(params)
    update = jax.jit(tx.update)
    bad = jax.tree.map(lambda p: jnp.full(p.shape, jnp.inf), params)
    updates, state = update(bad, state, params)
    assert int(state.notfinite_count) == 1
    for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)
    good = jax.tree.map(lambda p: rand(5, p.shape), params)
    updates, state = update(good, state, params)
    assert int(state.notfinite_count) == 0
    # After the skipped step the update is scaled GD's (default reg) of the good gradient.
    want_a, want_b = precondition_flax(
        good["q"]["lora_a"],
        good["q"]["lora_b"],
        params["q"]["lora_a"],
        params["q"]["lora_b"],
        P.DEFAULT_REG,
    )
    np.testing.assert_allclose(updates["q"]["lora_a"], -want_a, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(updates["q"]["lora_b"], -want_b, rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(updates["base"]["kernel"], -good["base"]["kernel"])


def test_inject_hyperparams_schedules_reg_without_recompiling():
    params = _lora_tree()
    grads = jax.tree.map(lambda p: rand(5, p.shape), params)
    regs = [1e-1, 1e-2, 1e-3]
    tx = optax.inject_hyperparams(riemannian_preconditioner)(
        reg=lambda count: jnp.asarray(regs, jnp.float32)[count]
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    for reg in regs:
        updates, state = update(grads, state, params)
        want_a, want_b = precondition_flax(
            grads["q"]["lora_a"],
            grads["q"]["lora_b"],
            params["q"]["lora_a"],
            params["q"]["lora_b"],
            reg,
        )
        np.testing.assert_allclose(updates["q"]["lora_a"], want_a, rtol=1e-4)
        np.testing.assert_allclose(updates["q"]["lora_b"], want_b, rtol=1e-4)
        np.testing.assert_array_equal(updates["base"]["kernel"], grads["base"]["kernel"])
    assert update._cache_size() == 1


@pytest.mark.parametrize("factory", [scaled_adamw, scaled_sgd])
def test_inject_hyperparams_wraps_the_scaled_optimizers(factory):
    target, a, b = _factorisation_problem()
    tx = optax.inject_hyperparams(factory)(learning_rate=1e-2, reg=1e-3)
    got = _run_jax(tx, target, a, b, 5)
    want = _run_jax(factory(1e-2, reg=1e-3), target, a, b, 5)
    for got_x, want_x in zip(got, want, strict=True):
        np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-6)


def test_no_recompilation_across_steps():
    _, a, b = _factorisation_problem()
    tx = scaled_adamw(1e-2)
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for i in range(4):
        grads = jax.tree.map(lambda p, i=i: p * (i + 1), params)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    assert update._cache_size() == 1


def test_nnx_optimizer_trains_lora_linear():
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, *, rngs):
            self.l1 = nnx.LoRALinear(8, 16, lora_rank=4, rngs=rngs)
            self.l2 = nnx.LoRALinear(16, 3, lora_rank=4, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.gelu(self.l1(x)))

    model = Model(rngs=nnx.Rngs(0))
    layers = (model.l1, model.l2)
    frozen = [(layer.kernel[...], layer.bias[...]) for layer in layers]
    kernel_before = np.asarray(model.l1.kernel[...])
    lora = [np.asarray(f[...], np.float64) for m in layers for f in (m.lora.lora_a, m.lora.lora_b)]
    x = rand(1, (64, 8))
    y = jnp.sin(x[:, :3] * 2.0)
    optimizer = nnx.Optimizer(model, scaled_adamw(3e-2), wrt=nnx.LoRAParam)
    pairs = rplora_jax.find_lora_pairs(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))
    assert [(p.a_path, p.b_path) for p in pairs] == [
        ("l1/lora/lora_a", "l1/lora/lora_b"),
        ("l2/lora/lora_a", "l2/lora/lora_b"),
    ]

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(60):
        train_step(model, optimizer)
    np.testing.assert_array_equal(model.l1.kernel[...], kernel_before)

    # The same model as a function of [a1, b1, a2, b2], trained by the NumPy reference.
    def loss_fn(factors):
        h = x
        for i, (kernel, bias) in enumerate(frozen):
            h = h @ kernel + bias[None] + h @ factors[2 * i] @ factors[2 * i + 1]
            h = jax.nn.gelu(h) if i == 0 else h
        return jnp.mean((h - y) ** 2)

    grad_fn = jax.jit(jax.grad(loss_fn))
    opt = AdamW(3e-2)
    for _ in range(60):
        g = grad_fn([jnp.asarray(v, jnp.float32) for v in lora])
        g = [np.asarray(v, np.float64) for v in g]
        g_1 = precondition_flax(*g[:2], *lora[:2], P.DEFAULT_REG)
        g_2 = precondition_flax(*g[2:], *lora[2:], P.DEFAULT_REG)
        lora = opt.step(lora, [*g_1, *g_2])
    got = [np.asarray(f[...]) for m in layers for f in (m.lora.lora_a, m.lora.lora_b)]
    # Measured max error 8e-6; plain AdamW ends 0.3 or more away in every factor, reg=0 0.2.
    for got_x, want_x in zip(got, lora, strict=True):
        np.testing.assert_allclose(got_x, want_x, rtol=1e-3, atol=5e-5)


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_factors(dtype):
    params = {"lora_a": rand(1, (16, 4), dtype), "lora_b": rand(2, (4, 12), dtype)}
    grads = {"lora_a": rand(3, (16, 4), dtype), "lora_b": rand(4, (4, 12), dtype)}
    updates = precondition(params, grads, 1e-2)
    want_a, want_b = precondition_flax(
        grads["lora_a"], grads["lora_b"], params["lora_a"], params["lora_b"], 1e-2
    )
    assert updates["lora_a"].dtype == dtype and updates["lora_b"].dtype == dtype
    # The algebra runs in float32: only the final rounding to `dtype` is lost.
    tol = float(jnp.finfo(dtype).eps) * 2
    np.testing.assert_allclose(
        np.asarray(updates["lora_a"], np.float64), want_a, rtol=tol, atol=tol
    )
    np.testing.assert_allclose(
        np.asarray(updates["lora_b"], np.float64), want_b, rtol=tol, atol=tol
    )


@pytest.mark.usefixtures("strict_promotion")
def test_zero_b_with_reg_zero_falls_back_to_identity():
    # LoRA's initial state: b = 0, so b b^T = 0 is singular; a^T a is fine.
    params = {"lora_a": rand(1, (10, 3)), "lora_b": jnp.zeros((3, 7))}
    grads = {"lora_a": rand(3, (10, 3)), "lora_b": rand(4, (3, 7))}
    updates = precondition(params, grads, 0.0)
    np.testing.assert_array_equal(updates["lora_a"], grads["lora_a"])
    _, want_b = precondition_flax(
        grads["lora_a"], grads["lora_b"], params["lora_a"], params["lora_b"], 0.0
    )
    np.testing.assert_allclose(updates["lora_b"], want_b, rtol=2e-5)


@pytest.mark.usefixtures("strict_promotion")
def test_rank_deficient_and_zero_factors_stay_finite():
    a = jnp.concatenate([rand(1, (10, 1))] * 3, axis=1)  # rank 1 of 3
    params = {"lora_a": a, "lora_b": jnp.zeros((3, 7))}
    grads = {"lora_a": rand(3, (10, 3)), "lora_b": rand(4, (3, 7))}
    updates = precondition(params, grads, 0.0)
    np.testing.assert_array_equal(updates["lora_a"], grads["lora_a"])
    np.testing.assert_array_equal(updates["lora_b"], grads["lora_b"])
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates = precondition(zeros, grads, 0.0)
    np.testing.assert_array_equal(updates["lora_a"], grads["lora_a"])
    np.testing.assert_array_equal(updates["lora_b"], grads["lora_b"])


def test_float16_gradients_saturate_instead_of_overflowing():
    # LoRA's first step with the paper's reg=1e-6: b = 0, so inv(b b^T + reg I) = 1e6 I, and
    # float16 gradients of 1 came back as inf. They now saturate at 65504; float32 ones are the
    # formula's.
    params = {"lora_a": np.ones((8, 3), np.float32), "lora_b": np.zeros((3, 4), np.float32)}
    grads = {"lora_a": np.ones((8, 3), np.float16), "lora_b": np.ones((3, 4), np.float16)}
    out = rplora_jax.riemannian_preconditioner(reg=1e-6).update(grads, None, params)[0]
    assert out["lora_a"].dtype == np.float16
    np.testing.assert_array_equal(out["lora_a"], np.full((8, 3), 65504, np.float16))
    grads32 = jax.tree.map(lambda g: g.astype(np.float32), grads)
    out32 = rplora_jax.riemannian_preconditioner(reg=1e-6).update(grads32, None, params)[0]
    np.testing.assert_allclose(out32["lora_a"], np.full((8, 3), 1e6), rtol=1e-5)
    # The same from a rank-deficient a (rank 2 of 3) with reg=0, whose Gram's last pivot is
    # float32 rounding noise that can pass the singularity test: finite either way.
    rng = np.random.default_rng(13)
    a = (rng.normal(size=(64, 2)) @ rng.normal(size=(2, 3))).astype(np.float32)
    params = {"lora_a": a, "lora_b": np.ones((3, 4), np.float32)}
    out = rplora_jax.riemannian_preconditioner(reg=0.0).update(
        grads | {"lora_a": np.ones((64, 3), np.float16)}, None, params
    )[0]
    assert np.all(np.isfinite(out["lora_b"]))


def test_stacked_axes_under_inject_hyperparams_needs_static_args():
    # inject_hyperparams turns the int into an array, which failed deep in the pairing
    # (unhashable type / TracerBoolConversionError).
    params = {"lora_a": jnp.ones((2, 8, 4)), "lora_b": jnp.ones((2, 4, 8))}
    tx = optax.inject_hyperparams(scaled_sgd)(learning_rate=1e-2, stacked_axes=1)
    with pytest.raises(TypeError, match=r"static_args=\('stacked_axes',\)"):
        tx.init(params)
    tx = optax.inject_hyperparams(scaled_sgd, static_args=("stacked_axes",))(
        learning_rate=1e-2, stacked_axes=1
    )
    updates, _ = tx.update(params, tx.init(params), params)
    assert updates["lora_a"].shape == (2, 8, 4)


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("rank", [3, 64])
def test_cpu_and_cholesky_inverses_agree(rank):
    # CPU inverts by Gauss-Jordan; GPU/TPU by Cholesky. Both must give inv(m + reg I), and the
    # identity for the singular matrices LoRA starts with, in the same cases.
    # Built in NumPy: eager jnp ops would each compile.
    x = np.asarray(rand(5, (4, rank, rank + 2)))
    singular = np.zeros((1, rank, rank), np.float32)
    m = np.concatenate([x @ np.swapaxes(x, -1, -2), singular])
    eye = np.broadcast_to(np.eye(rank, dtype=np.float32), m.shape)
    gj = np.asarray(jax.jit(_linalg.gauss_jordan_inverse)(m + np.float32(1e-3) * eye, eye))
    chol = np.asarray(jax.jit(_linalg.cholesky_inverse)(m + np.float32(1e-3) * eye, eye))
    m64 = np.asarray(m[:4], np.float64) + 1e-3 * np.eye(rank)
    want = np.linalg.inv(m64)
    if rank == 3:
        # Condition numbers 7-61: float32 gets every entry to a few 1e-6 relative (2.3e-6 measured).
        np.testing.assert_allclose(gj[:4], want, rtol=1e-5, atol=0)
        np.testing.assert_allclose(chol[:4], want, rtol=1e-5, atol=0)
    else:
        # Near-square 64 x 66 factors: condition numbers 6e3-2.6e4, so float32 can only promise
        # ||error|| / ||inv|| <~ cond * eps (up to 3e-3 here), and small entries have no relative
        # accuracy at all (0.3 measured). Measured normwise error: at most 0.04 of that bound
        # (1.2e-4) for both inverses.
        bound = np.linalg.cond(m64) * np.finfo(np.float32).eps
        for got in (gj[:4], chol[:4]):
            err = np.asarray(got, np.float64) - want
            rel = np.linalg.norm(err, 2, axis=(-2, -1)) / np.linalg.norm(want, 2, axis=(-2, -1))
            assert np.all(rel < bound), (rel, bound)
    gj0 = jax.jit(_linalg.gauss_jordan_inverse)(m, eye)
    np.testing.assert_array_equal(gj0[4], np.eye(rank))
    np.testing.assert_array_equal(jax.jit(_linalg.cholesky_inverse)(m, eye)[4], np.eye(rank))


_MANY_PAIRS = """
import jax, jax.numpy as jnp, numpy as np, rplora_jax
from rplora_jax import preconditioner, _grouping
p = {f"l{i}": {"lora_a": jnp.full((384, 64), 0.01 + i), "lora_b": jnp.full((64, 384), 0.01)}
     for i in range(16)}
# Inverses in batches of 8 Grams, which hung; one batch of 32 did not.
tx = preconditioner._transformation(1e-2, tuning=_grouping.DEFAULT._replace(chunk=4))
u, _ = jax.jit(tx.update)(p, tx.init(p), p)
a, b = (np.asarray(p["l3"][n], np.float64) for n in ("lora_a", "lora_b"))
want = a @ np.linalg.inv(b @ b.T + 1e-2 * np.eye(64))
print(np.abs(np.asarray(u["l3"]["lora_a"]) - want).max() / np.abs(want).max())
"""


def test_many_high_rank_pairs_do_not_hang():
    # These 16 rank-64 pairs never finished one update with the LAPACK Cholesky of jaxlib 0.10.0
    # to 0.10.2 on CPU (all threads idle); a subprocess makes a regression fail instead of
    # hanging the suite.
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _MANY_PAIRS], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 1e-3  # float32 Grams, condition number ~250


def test_specs_outside_shard_map_change_nothing():
    # specs= matters only for manual (shard_map) axes; on global arrays it is harmless, whatever
    # the names. The 8-device shard_map cases are in tests/test_shard_map_checks.py.
    from jax.sharding import PartitionSpec as PS

    params = {"q": {"lora_a": rand(1, (6, 2)), "lora_b": rand(2, (2, 5))}}
    grads = {"q": {"lora_a": rand(3, (6, 2)), "lora_b": rand(4, (2, 5))}}
    specs = {"q": {"lora_a": PS("data", None), "lora_b": PS(None, "model")}}
    want = precondition(params, grads, 1e-2)
    got = precondition(params, grads, 1e-2, specs=specs)
    for name in ("lora_a", "lora_b"):
        np.testing.assert_array_equal(got["q"][name], want["q"][name])
    with pytest.raises(ValueError, match="not both"):
        rplora_jax.scaled_adamw(1e-3, axis_name="model", specs=specs)
    with pytest.raises(ValueError, match="not both"):
        rplora_jax.scaled_sgd(1e-3, axis_name="model", specs=specs)


def test_update_without_params_is_an_error():
    tx = riemannian_preconditioner()
    params = _lora_tree()
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))


def test_negative_reg_is_an_error():
    with pytest.raises(ValueError, match="reg must be a non-negative"):
        riemannian_preconditioner(-1.0)
    with pytest.raises(ValueError, match="reg must be a non-negative"):
        riemannian_preconditioner(np.float32(-1.0))
    # A per-rank array used to become a ridge per Gram row; a schedule or None failed deep in
    # the first update without naming reg.
    with pytest.raises(ValueError, match=r"reg must be a scalar, got shape \(2,\)"):
        riemannian_preconditioner(jnp.array([0.1, 0.2]))
    for bad in (optax.linear_schedule(0.1, 0.001, 10), None):
        with pytest.raises(TypeError, match=r"reg must be .* optax.inject_hyperparams"):
            rplora_jax.scaled_adamw(1e-3, reg=bad)


def test_a_gradient_of_the_wrong_shape_is_named_as_such():
    params = {"x": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}}
    grads = {"x": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((5, 2))}}  # transposed
    tx = riemannian_preconditioner()
    with pytest.raises(ValueError, match=r"Gradient at 'x/lora_b' has shape \(5, 2\) but its"):
        tx.update(grads, tx.init(params), params)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"x": {"lora_a": jnp.ones((4, 2))}}, r"'a' at 'x/lora_a'.*no matching 'b'"),
        ({"x": {"lora_b": jnp.ones((2, 4))}}, r"'b' at 'x/lora_b'.*no matching 'a'"),
        (
            {"x": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((3, 4))}},
            r"rank mismatch between a='x/lora_a' \(4, 2\) and b='x/lora_b' \(3, 4\)",
        ),
        (
            {"x": {"lora_a": jnp.ones((4,)), "lora_b": jnp.ones((2, 4))}},
            r"'x/lora_a' must have at least 2 axes",
        ),
        (
            {"x": {"lora_a": jnp.ones((4, 2), jnp.int32), "lora_b": jnp.ones((2, 4))}},
            r"'x/lora_a' must have a floating dtype, got int32",
        ),
        ({"w": jnp.ones((4, 4))}, r"no LoRA pairs among 1 leaves \(first paths: \['w'\]\)"),
    ],
)
def test_bad_input_names_the_leaf(params, message):
    with pytest.raises(ValueError, match=message):
        riemannian_preconditioner().init(params)


def test_allow_no_pairs_passes_everything_through():
    params = {"w": jnp.ones((4, 4))}
    tx = riemannian_preconditioner(allow_no_pairs=True)
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_array_equal(updates["w"], params["w"])


def test_mismatched_gradient_shape_is_an_error():
    params = _lora_tree()
    grads = dict(params, q={"lora_a": jnp.ones((6, 3)), "lora_b": params["q"]["lora_b"]})
    with pytest.raises(ValueError, match="'q/lora_a'"):
        precondition(params, grads)


def test_specs_are_matched_to_the_parameters_by_path():
    from jax.sharding import PartitionSpec as P

    params = {"x": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}}
    for specs, message in (
        ({"x": {"lora_a": P(), "typo": P()}}, r"no spec for \['x/lora_b'\]"),
        ({"x": P(), "y": P()}, r"specs for no parameter: \['y'\]"),
        ({"x": {"lora_a": P(), "lora_b": "data"}}, r"holds 'data' at 'x/lora_b'"),
    ):
        tx = riemannian_preconditioner(specs=specs)
        with pytest.raises(ValueError, match=message):
            tx.update(params, tx.init(params), params)
    tx = riemannian_preconditioner(specs=P())  # a prefix: one spec for every leaf
    assert tx.update(params, tx.init(params), params)[0]["x"]["lora_a"].shape == (6, 2)
    with_bias = {"x": {**params["x"], "bias": None}}  # a spec tree mapped over it keeps the None
    tx = riemannian_preconditioner(specs=jax.tree.map(lambda _: P(), with_bias))
    assert tx.update(with_bias, tx.init(with_bias), with_bias)[0]["x"]["bias"] is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["jit-explicit", "jit-stacked", "jit-explicit-stacked", "jit-explicit-einsum"]
)
def test_two_pairs_of_a_kind_on_8_devices(successor_report, case):
    # Two pairs of one kind share one batched Gram dot; on Explicit axes with the layers split
    # its output sharding must follow the stacked layers, not the pairs' axis.
    got = successor_report[f"scaled_adamw/{case}"]
    assert "error" not in got, got
    assert got["rel"] < 1e-6 and got["kept"], got
