"""Reduced-size ScaledGD matrix-sensing benchmark: scaled GD is insensitive to κ, GD is not."""

import numpy as np
import pytest

import experiments.matrix_sensing


@pytest.fixture(scope="module")
def ms():
    return experiments.matrix_sensing


@pytest.fixture(scope="module")
def results(ms):
    # n=30, r=3, m=5nr: the paper's ratios at a size that runs in seconds.
    s = ms.make_sensing(30, 3, 450, [1.0, 100.0], seed=0)
    cap = 3000
    runs = [ms.Run(f, 0.5, k, cap) for k in range(2) for f in ("gd", "scaled_gd")]
    traces = ms.run_all(s, runs, tol=1e-5, chunk=50)
    iters = {
        (r.family, s.kappas[r.kappa_idx]): ms.iterations_to(t, 1e-5)
        for r, t in zip(runs, traces, strict=True)
    }
    return iters, traces, cap


def test_scaled_gd_iterations_do_not_depend_on_kappa(results):
    iters, _, _ = results
    base, hard = iters[("scaled_gd", 1.0)], iters[("scaled_gd", 100.0)]
    assert base is not None and hard is not None
    assert hard <= 1.5 * base, iters
    # κ = 1 is perfectly conditioned: GD and scaled GD need about the same count there.
    assert abs(iters[("gd", 1.0)] - base) <= 0.2 * base, iters


def test_gd_iterations_grow_with_kappa(results):
    iters, _, cap = results
    gd1, gd100 = iters[("gd", 1.0)], iters[("gd", 100.0)]
    assert gd1 is not None and 5 * gd1 < cap
    # Not reaching tol within the cap counts as "at least cap" iterations.
    assert (gd100 if gd100 is not None else cap) >= 5 * gd1, iters


def test_errors_decrease_monotonically_for_scaled_gd(results):
    _, traces, _ = results
    t = traces[3]  # scaled_gd at κ = 100
    assert t[-1] <= 1e-5 < t[0]
    assert np.all(np.diff(np.log(t[5:])) < 0.02)


def test_bad_problem_sizes_raise(ms):
    with pytest.raises(ValueError, match="cannot identify"):
        ms.make_sensing(30, 3, 100, [1.0])
    with pytest.raises(ValueError, match="condition numbers"):
        ms.make_sensing(30, 3, 450, [0.5])
