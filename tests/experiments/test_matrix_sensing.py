"""Reduced-size ScaledGD matrix-sensing benchmark: scaled GD is insensitive to κ, GD is not."""

import csv
from collections import Counter

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


# End to end over several problem instances: tiny sizes, so the three seeds take seconds.
E2E_ARGS = [
    "--n", "12", "--r", "2", "--kappas", "1", "10", "--max-iters", "1000",
    "--adam-lrs", "1e-2", "3e-2", "--adam-iters", "400", "--seeds", "0", "1", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def e2e(ms, tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix_sensing")
    ms.main([*E2E_ARGS, "--out", str(out)])
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    with open(out / "paired.csv") as f:
        paired = list(csv.DictReader(f))
    with open(out / "aggregate.csv") as f:
        aggregate = list(csv.DictReader(f))
    return out, summary, paired, aggregate


def _best_iters(summary, kappa, optimizer):
    """``seed -> iterations to tol`` (None: not reached) at that seed's best rate."""
    return {
        int(r["seed"]): int(r["iters_to_tol"]) if r["iters_to_tol"] else None
        for r in summary
        if float(r["kappa"]) == kappa and r["optimizer"] == optimizer and r["best_lr"] == "1"
    }


@pytest.mark.slow
def test_e2e_one_row_per_seed_and_run(e2e):
    out, summary, _, _ = e2e
    # 2 κ x (GD, scaled GD, 2 rates x (AdamW, scaled AdamW)) = 12 runs per seed.
    assert len(summary) == 36
    assert sorted({int(r["seed"]) for r in summary}) == [0, 1, 2]
    for seed in (0, 1, 2):
        assert sum(int(r["seed"]) == seed for r in summary) == 12
    # Exactly one best rate per (optimizer, κ, seed).
    best = Counter((r["optimizer"], r["kappa"], r["seed"]) for r in summary if r["best_lr"] == "1")
    assert len(best) == 4 * 2 * 3 and set(best.values()) == {1}
    # The traces (and plot) are the first seed's only.
    with open(out / "traces.csv") as f:
        assert {r["seed"] for r in csv.DictReader(f)} == {"0"}
    assert (out / "error_vs_iteration.png").stat().st_size > 0


@pytest.mark.slow
def test_e2e_summary_md_has_the_command_and_tables(e2e):
    out, _, paired, _ = e2e
    md = (out / "summary.md").read_text()
    command = "python -m experiments.matrix_sensing " + " ".join(E2E_ARGS) + f" --out {out}"
    assert f"    {command}\n" in md
    assert "3 independent instances (seeds 0 1 2)" in md
    assert "## Paired comparison" in md
    for p in paired:
        assert p["verdict"] in md


@pytest.mark.slow
def test_e2e_paired_ratios_match_a_recomputation(e2e):
    _, summary, paired, _ = e2e
    assert len(paired) == 4
    assert [(float(p["kappa"]), p["control"]) for p in paired] == [
        (1.0, "gd"), (1.0, "adamw"), (10.0, "gd"), (10.0, "adamw"),
    ]  # fmt: skip
    t975_df2 = 4.302653
    for p in paired:
        kappa = float(p["kappa"])
        treat = _best_iters(summary, kappa, p["treatment"])
        ctrl = _best_iters(summary, kappa, p["control"])
        both = [s for s in treat if treat[s] is not None and ctrl[s] is not None]
        # Every run of this configuration reaches tol, so all three seeds pair up.
        assert len(both) == 3 == int(p["seeds_both"]), (p, treat, ctrl)
        assert int(p["only_treatment_reached"]) == int(p["only_control_reached"]) == 0
        logs = np.log([ctrl[s] / treat[s] for s in both])
        half = t975_df2 * logs.std(ddof=1) / np.sqrt(3)
        # paired.csv keeps 4 significant digits.
        np.testing.assert_allclose(float(p["geo_mean_ratio"]), np.exp(logs.mean()), rtol=6e-4)
        np.testing.assert_allclose(float(p["ratio_lo"]), np.exp(logs.mean() - half), rtol=6e-4)
        np.testing.assert_allclose(float(p["ratio_hi"]), np.exp(logs.mean() + half), rtol=6e-4)
        lo, hi = float(p["ratio_lo"]), float(p["ratio_hi"])
        expected = (
            "within noise"
            if lo <= 1 <= hi
            else f"{p['treatment'] if lo > 1 else p['control']} needs fewer iterations"
        )
        assert p["verdict"] == expected
    # At κ = 10 scaled GD is several times faster than GD on every instance.
    gd10 = paired[2]
    assert float(gd10["ratio_lo"]) > 3 and gd10["verdict"] == "scaled_gd needs fewer iterations"


@pytest.mark.slow
def test_e2e_aggregate_is_median_and_range_over_seeds(e2e):
    _, summary, _, aggregate = e2e
    assert len(aggregate) == 8
    for a in aggregate:
        iters = _best_iters(summary, float(a["kappa"]), a["optimizer"])
        vals = np.array(list(iters.values()), np.float64)
        assert int(a["seeds"]) == 3 == int(a["reached"])
        assert float(a["median_iters"]) == np.median(vals)
        assert float(a["min_iters"]) == vals.min() and float(a["max_iters"]) == vals.max()
        lrs = Counter(
            r["lr"]
            for r in summary
            if r["kappa"] == a["kappa"] and r["optimizer"] == a["optimizer"] and r["best_lr"] == "1"
        )
        assert int(a["modal_lr_seeds"]) == max(lrs.values())


def _rows(pairs, treatment="scaled_gd", control="gd", kappa=1.0):
    """Best-rate summary rows from ``[(treatment_iters, control_iters), ...]``, one per seed."""
    return [
        {"seed": sd, "optimizer": f, "kappa": kappa, "lr": 0.5, "iters_to_tol": it,
         "iters_run": 1000 if it is None else it, "best_lr": 1}
        for sd, (t, c) in enumerate(pairs)
        for f, it in ((treatment, t), (control, c))
    ]  # fmt: skip


def test_paired_comparison_counts_seeds_only_one_reached(ms):
    # Seed 2: only the treatment reached tol; seed 3: only the control.
    [p] = ms.paired_comparison(
        _rows([(100, 200), (100, 300), (100, None), (None, 500)]), "scaled_gd", "gd"
    )
    assert p["seeds_both"] == 2
    assert p["only_treatment_reached"] == 1 and p["only_control_reached"] == 1
    logs = np.log([2.0, 3.0])
    half = 12.706205 * logs.std(ddof=1) / np.sqrt(2)
    assert p["geo_mean_ratio"] == pytest.approx(np.sqrt(6.0))
    assert p["ratio_lo"] == pytest.approx(np.exp(logs.mean() - half))
    assert p["ratio_hi"] == pytest.approx(np.exp(logs.mean() + half))
    # t with 1 degree of freedom: the interval [0.18, 33] contains 1.
    assert p["verdict"] == "within noise"


def test_paired_comparison_verdicts(ms):
    [slower] = ms.paired_comparison(_rows([(200, 100), (210, 100), (190, 100)]), "scaled_gd", "gd")
    assert slower["ratio_hi"] < 1 and slower["verdict"] == "gd needs fewer iterations"
    [one] = ms.paired_comparison(_rows([(100, 200), (100, None)]), "scaled_gd", "gd")
    assert one["seeds_both"] == 1 and one["geo_mean_ratio"] == pytest.approx(2.0)
    assert np.isnan(one["ratio_lo"]) and one["verdict"].startswith("no interval")


def test_seed_flag_is_gone(ms, tmp_path, capsys):
    # Both fail while parsing, before any problem is drawn.
    with pytest.raises(SystemExit):
        ms.main(["--seed", "0", "--out", str(tmp_path)])
    assert "unrecognized arguments: --seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ms.main(["--seeds", "1", "1", "--out", str(tmp_path)])
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
