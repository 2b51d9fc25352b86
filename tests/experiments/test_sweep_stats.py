"""The classification sweep's bookkeeping: resumable runs.csv and the summary's statistics."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

import experiments.finetune_classification as ft
from experiments import stats


def test_sample_sd_uses_ddof_1():
    assert stats.sample_sd([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.sqrt(5 / 3))
    assert stats.sample_sd([2.0, 4.0]) == pytest.approx(np.sqrt(2.0))
    assert math.isnan(stats.sample_sd([1.0]))
    # Diverged (NaN) runs are left out.
    assert stats.sample_sd([2.0, float("nan"), 4.0]) == pytest.approx(np.sqrt(2.0))


def test_t_interval_known_answers():
    # x = 1, 2, 3: mean 2, sd 1, t_{0.975}(2) = 4.3027: 2 ± 4.3027 / sqrt(3).
    mean, lo, hi = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302653 / np.sqrt(3)
    assert (mean, lo, hi) == pytest.approx((2.0, 2 - half, 2 + half), rel=1e-5)
    # Two values 0, 2: mean 1, sd sqrt(2), t(1) = 12.706: 1 ± 12.706.
    expected = (1.0, 1 - 12.706205, 1 + 12.706205)
    assert stats.t_interval([0.0, 2.0]) == pytest.approx(expected, rel=1e-5)
    mean, lo, hi = stats.t_interval([5.0])
    assert mean == 5.0 and math.isnan(lo) and math.isnan(hi)


def test_verdict_words():
    assert stats.verdict(-0.5, 1.0, "scaled", "plain") == "within noise"
    assert stats.verdict(0.1, 1.0, "scaled", "plain") == "scaled better"
    assert stats.verdict(-2.0, -0.1, "scaled", "plain") == "plain better"
    assert stats.verdict(float("nan"), float("nan"), "a", "b").startswith("no interval")


def test_paired_bootstrap_interval():
    x = np.random.default_rng(1).normal(size=200)
    est, lo, hi = stats.paired_bootstrap(lambda idx: x[idx].mean(), len(x), resamples=2000)
    assert est == pytest.approx(x.mean())
    # The percentile interval of a mean is close to mean ± 1.96 sd / sqrt(n).
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)
    same = stats.paired_bootstrap(lambda idx: x[idx].mean() - x[idx].mean(), len(x))
    assert same == (0.0, 0.0, 0.0)


def _row(o, lr, seed, acc):
    return {"optimizer": o, "lr": lr, "seed": seed, "eval_acc": acc}


def test_paired_differences_pair_seeds():
    rows = [
        *(_row("adamw", 1e-3, s, a) for s, a in enumerate([0.70, 0.72, 0.74])),
        *(_row("scaled_adamw", 1e-3, s, a) for s, a in enumerate([0.71, 0.74, 0.77])),
        *(_row("adamw", 1e-2, s, a) for s, a in enumerate([0.60, 0.50, 0.55])),
        *(_row("scaled_adamw", 1e-2, s, a) for s, a in enumerate([0.80, 0.81, 0.79])),
    ]
    by_lr = {d["lr"]: d for d in ft.paired_differences(rows, "scaled_adamw", "adamw")}
    # At 1e-3 the differences are 1, 2, 3 points: mean 2, t-interval 2 ± 4.30 / sqrt(3).
    d = by_lr[1e-3]
    assert d["n"] == 3 and d["mean"] == pytest.approx(2.0)
    assert d["lo"] == pytest.approx(2 - 4.302653 / np.sqrt(3), rel=1e-4)
    assert d["verdict"] == "within noise"
    # At 1e-2: 20, 31, 24 points, clearly positive.
    assert by_lr[1e-2]["mean"] == pytest.approx(25.0)
    assert by_lr[1e-2]["verdict"] == "scaled_adamw better"
    # Best vs best: scaled at 1e-2 (0.80) against adamw at 1e-3 (0.72): 10, 9, 5 points.
    assert by_lr["best"]["mean"] == pytest.approx(8.0)


def test_the_best_rates_can_be_chosen_on_validation_accuracy():
    # Validation prefers adamw's 1e-2 (where its test accuracy is lower): "best" pairs the
    # test accuracies at the rates validation chose, 0.80 against 0.55 on average.
    rows = [
        *(_row("adamw", 1e-3, s, a) | {"val_acc": 0.6} for s, a in enumerate([0.70, 0.72, 0.74])),
        *(_row("adamw", 1e-2, s, a) | {"val_acc": 0.7} for s, a in enumerate([0.60, 0.50, 0.55])),
        *(
            _row("scaled_adamw", lr, s, a) | {"val_acc": v}
            for lr, v, accs in ((1e-3, 0.6, [0.71, 0.74, 0.77]), (1e-2, 0.7, [0.80, 0.81, 0.79]))
            for s, a in enumerate(accs)
        ),
    ]
    on_test = {d["lr"]: d for d in ft.paired_differences(rows, "scaled_adamw", "adamw")}
    on_val = {
        d["lr"]: d for d in ft.paired_differences(rows, "scaled_adamw", "adamw", select="val_acc")
    }
    assert on_test["best"]["mean"] == pytest.approx(8.0)
    assert on_val["best"]["mean"] == pytest.approx(25.0)
    assert on_val[1e-3] == on_test[1e-3]  # the same-rate entries do not depend on the choice


def test_runs_from_before_the_validation_split_are_read_but_not_extended(tmp_path):
    path = tmp_path / "runs.csv"
    legacy = [f for f in ft.RUN_FIELDS if f != "val_acc"]
    path.write_text(",".join(legacy) + "\nd,adamw,0.001,0,10,0.75,0.5,1.0,False,x\n")
    (row,) = ft._read_runs(path)
    assert row["eval_acc"] == 0.75 and np.isnan(row["val_acc"])
    with pytest.raises(ValueError, match="older format"):
        ft.run_sweep([("adamw", 0.01, 0)], None, tmp_path, dataset="d", steps=10, settings="x")


def test_paired_differences_leave_out_diverged_pairs():
    rows = [
        *(_row("sgd", 1.0, s, a) for s, a in enumerate([0.5, float("nan"), 0.6])),
        *(_row("scaled_sgd", 1.0, s, a) for s, a in enumerate([0.6, 0.7, 0.8])),
    ]
    d, _ = ft.paired_differences(rows, "scaled_sgd", "sgd")
    assert (d["n"], d["diverged"]) == (2, 1)
    assert d["mean"] == pytest.approx(15.0)


class FakeRuns:
    """Stands in for train_run: records calls, and can fail at a given call to mimic a crash."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, o, lr, seed):
        if len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        self.calls.append((o, lr, seed))
        acc = 0.5 + 0.1 * seed + (0.05 if o.startswith("scaled") else 0.0)
        return {
            "eval_acc": acc,
            "val_acc": acc - 0.01,
            "train_loss": 1.0 / (1 + seed),
            "seconds": 0.1,
            "diverged": False,
            "losses": [(1, 0.9), (2, 0.8)],
        }


JOBS = [(o, lr, s) for o in ("adamw", "scaled_adamw") for lr in (1e-4, 1e-3) for s in (0, 1)]


def _sweep(out, run, settings="steps=2;rank=4"):
    return ft.run_sweep(JOBS, run, out, dataset="toy", steps=2, settings=settings)


def test_sweep_appends_each_run_and_resumes(tmp_path):
    crashing = FakeRuns(fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        _sweep(tmp_path, crashing)
    # The three finished runs are on disk, each with its curve.
    with open(tmp_path / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 3
    with open(tmp_path / "curves.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 6
    again = FakeRuns()
    rows = _sweep(tmp_path, again)
    assert again.calls == JOBS[3:]
    assert [(r["optimizer"], r["lr"], r["seed"]) for r in rows] == JOBS
    assert rows[0]["eval_acc"] == pytest.approx(0.5) and rows[0]["diverged"] is False
    # A third run has nothing left to do; the file holds each run once.
    third = FakeRuns()
    assert _sweep(tmp_path, third) == rows
    assert third.calls == []
    with open(tmp_path / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(JOBS)


def test_changed_settings_are_new_runs(tmp_path):
    _sweep(tmp_path, FakeRuns())
    other = FakeRuns()
    rows = _sweep(tmp_path, other, settings="steps=2;rank=8")
    assert other.calls == JOBS
    assert {r["settings"] for r in rows} == {"steps=2;rank=8"}
    with open(tmp_path / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(JOBS)


def test_old_runs_csv_is_an_error(tmp_path):
    (tmp_path / "runs.csv").write_text("dataset,optimizer,lr,seed\n")
    with pytest.raises(ValueError, match="another --out"):
        _sweep(tmp_path, FakeRuns())


def test_settings_string_is_canonical():
    s = ft.settings_string({"steps": 2, "lr_ratio": 16.0, "targets": ["query", "value"]})
    assert s == "steps=2;lr_ratio=16.0;targets=query,value"
    assert ft.run_key("adamw", np.float64(1e-3), 0, s) == ft.run_key("adamw", 0.001, 0, s)


def test_leave_one_seed_out_picks_each_seeds_rate_from_the_others():
    rows = [
        _row("o", lr, s, a)
        for lr, accs in ((1.0, (0.9, 0.5, 0.5)), (2.0, (0.6, 0.6, 0.6)))
        for s, a in enumerate(accs)
    ]
    acc, picks = ft.leave_one_seed_out(rows, "o")
    assert picks == [2.0, 1.0, 1.0] and acc == pytest.approx((0.6 + 0.5 + 0.5) / 3)


@pytest.mark.parametrize(
    ("dataset", "optimizer", "expected"),
    [
        ("rotten_tomatoes", "scaled_adamw", 75.18),
        ("rotten_tomatoes", "loraplus_adamw", 73.66),
        ("reuters_r8", "adamw", 94.88),
    ],
)
def test_leave_one_seed_out_figures_on_the_fine_tuning_page(dataset, optimizer, expected):
    from pathlib import Path

    runs = Path(__file__).resolve().parents[2] / "results" / "finetune" / dataset / "runs.csv"
    acc, _ = ft.leave_one_seed_out(ft._read_runs(runs), optimizer)
    assert 100 * acc == pytest.approx(expected, abs=0.005)


def test_leave_one_seed_out_never_picks_a_rate_with_a_diverged_run():
    rows = [
        _row("o", lr, s, a)
        for lr, accs in (
            (1e-4, (0.60, float("nan"), 0.61)),
            (1e-3, (0.80, 0.81, 0.79)),
            (1e-2, (0.70, 0.70, 0.70)),
        )
        for s, a in enumerate(accs)
    ]
    acc, picks = ft.leave_one_seed_out(rows, "o")
    assert picks == [1e-3] * 3 and acc == pytest.approx(0.80)


def test_power_of_the_paired_tests():
    # A standard value: 10 pairs, an effect of one sd, two-sided 5%: power 0.80.
    assert stats.power_paired_t(1.0, 1.0, 10, 0.05) == pytest.approx(0.803, abs=1e-3)
    assert stats.power_paired_t(0.0, 1.0, 10, 0.05) == pytest.approx(0.05, abs=1e-9)
    tost = [stats.power_tost(1.0, 1.0, n, 0.05) for n in (5, 10, 20, 40)]
    assert tost == sorted(tost) and tost[0] < 0.5 and tost[-1] > 0.95
    assert stats.power_tost(1.0, 1.0, 20, 0.05, delta=1.0) < 0.06  # at the margin: about alpha


def test_the_preregistrations_variances_come_from_the_committed_sweeps():
    from experiments import power

    root = Path(__file__).resolve().parents[2] / "results" / "finetune"
    rt, r8 = (power.paired_sds(root / d / "runs.csv") for d in ("rotten_tomatoes", "reuters_r8"))
    assert (round(rt["best"], 2), round(rt["one step above"], 2)) == (0.75, 6.98)
    assert (round(r8["best"], 2), round(r8["one step above"], 2)) == (0.24, 1.47)
