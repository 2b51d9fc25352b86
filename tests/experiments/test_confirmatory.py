"""The pre-registered analysis on synthetic runs whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

import experiments.finetune_classification as ft
from experiments import confirmatory as cf


def test_holm_and_the_grid_steps():
    assert cf.holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert cf.holm([0.5, 0.001]) == [0.5, 0.002]
    assert [cf.half_decades_above(3.2e-3, k) for k in (1, 2)] == [0.01, 0.032]
    assert [cf.half_decades_above(1e-3, k) for k in (1, 2)] == [0.0032, 0.01]


ONE_DATASET = {"primary": 4, "secondary": 4}


def _run(o, lr, seed, acc, val=None, diverged=False):
    return {"dataset": "toy", "optimizer": o, "lr": lr, "seed": seed, "steps": 10,
            "eval_acc": float("nan") if diverged else acc,
            "val_acc": float("nan") if diverged else acc if val is None else val,
            "train_loss": 0.1, "seconds": 1.0, "diverged": diverged,
            "settings": "steps=10;n_val=1000"}  # fmt: skip


def test_rates_are_chosen_on_validation_and_a_diverged_rate_ranks_last(tmp_path):
    rows = [
        # adamw: test prefers 1e-3, validation 3.2e-3; 1e-2 has the best validation mean of
        # the finite runs' but one diverged seed
        *(_run("adamw", 1e-3, s, 0.9, val=0.70) for s in range(3)),
        *(_run("adamw", 3.2e-3, s, 0.8, val=0.75) for s in range(3)),
        *(_run("adamw", 1e-2, s, 0.8, val=0.9, diverged=s == 2) for s in range(3)),
        *(_run("sgd", lr, s, 0.5, val=v) for lr, v in ((0.1, 0.6), (0.32, 0.5)) for s in range(3)),
    ]
    ft._append(tmp_path / "runs.csv", ft.RUN_FIELDS, rows)
    chosen = cf.chosen_rates(tmp_path)
    assert chosen["adamw"]["lr"] == 3.2e-3 and not chosen["adamw"]["edge"]
    assert chosen["sgd"]["lr"] == 0.1 and chosen["sgd"]["edge"]
    assert cf.stage2_lrs(chosen) == {"adamw": [3.2e-3, 0.01, 0.032], "sgd": [0.1]}


def _stage2(effects, chance_runs=()):
    """20 seeds per (optimizer, rate): accuracy base + effect + noise (points / 100)."""
    rng = np.random.default_rng(0)
    rows = []
    for (o, lr), effect in effects.items():
        for s in range(100, 120):
            rows.append(_run(o, lr, s, 0.70 + (effect + rng.normal(0, 0.3)) / 100,
                             diverged=(o, lr, s) in chance_runs))  # fmt: skip
    return rows


def test_the_hypotheses_on_runs_with_known_answers():
    chosen = {o: {"lr": lr} for o, lr in (("sgd", 0.1), ("scaled_sgd", 0.32), ("adamw", 1e-3),
              ("scaled_adamw", 1e-3), ("lora_rite", 1e-3), ("reflora_adamw", 3.2e-3))}  # fmt: skip
    effects = {
        ("sgd", 0.1): 0.0, ("scaled_sgd", 0.32): 3.0,  # H1: +3 points
        ("adamw", 1e-3): 0.0, ("scaled_adamw", 1e-3): 0.0,  # H3: equivalent
        ("adamw", 0.0032): 0.0, ("scaled_adamw", 0.0032): 0.0,  # H2 at +1: no effect
        ("adamw", 0.01): 0.0, ("scaled_adamw", 0.01): 5.0,  # H2 at +2: +5, but ...
        ("lora_rite", 1e-3): -2.0, ("reflora_adamw", 3.2e-3): 0.0,
    }  # fmt: skip
    rows = _stage2(effects)
    results = cf.decide(cf.tests_for("toy", chosen, rows, chance=0.5), ONE_DATASET)
    verdicts = {r["hypothesis"]: r["verdict"] for r in results}
    assert verdicts == {
        "H1 scaled_sgd > sgd": "supported",
        "H2 scaled_adamw > adamw at +1 (0.0032)": "not supported",
        "H2 scaled_adamw > adamw at +2 (0.01)": "supported",
        "H3 |scaled_adamw - adamw| < 1": "supported",
        "H4 lora_rite vs scaled_adamw": "worse",
        "H4 lora_rite vs adamw": "worse",
        "H4 reflora_adamw vs scaled_adamw": "no difference detected",
        "H4 reflora_adamw vs adamw": "no difference detected",
    }
    assert all(r["n"] == 20 for r in results)
    # ... a diverged run scores the majority class (50%): six diverged scaled AdamW seeds at +2
    # turn its 5-point gain into a loss, where dropping them would have kept it.
    diverged = {("scaled_adamw", 0.01, s) for s in range(100, 106)}
    results = cf.decide(
        cf.tests_for("toy", chosen, _stage2(effects, diverged), chance=0.5), ONE_DATASET
    )
    h2 = next(r for r in results if r["hypothesis"].startswith("H2") and "+2" in r["hypothesis"])
    assert h2["verdict"] == "not supported" and h2["mean"] < 0


def test_equivalence_needs_the_whole_interval_inside_the_margin():
    rng = np.random.default_rng(1)
    assert cf.equivalence_test(rng.normal(0, 0.3, 20), 1.0) < 1e-6
    assert cf.equivalence_test(rng.normal(2, 0.3, 20), 1.0) > 0.5
    assert cf.difference_test(np.array([1.0, 2.0, 3.0])) == pytest.approx(0.0742, abs=1e-4)


def _full_stage1(best: dict, dataset: str = "toy") -> list[dict]:
    """Stage 1 over every pre-registered grid, validation accuracy highest at ``best[o]``."""
    return [
        _run(o, lr, s, 0.8, val=0.9 - 0.01 * abs(np.log10(lr / best[o]))) | {"dataset": dataset}
        for o, grid in cf.GRIDS.items()
        for lr in grid
        for s in range(3)
    ]


BEST = {"adamw": 1e-3, "scaled_adamw": 3.2e-3, "lora_rite": 1e-3, "reflora_adamw": 3.2e-3,
        "sgd": 3.2e-2, "scaled_sgd": 1.0}  # fmt: skip


def test_rates_prints_the_stage2_command(tmp_path, capsys):
    ft._append(tmp_path / "runs.csv", ft.RUN_FIELDS, _full_stage1(BEST))
    cf.main(["rates", "--stage1", str(tmp_path)])
    out = capsys.readouterr().out
    assert " scaled_sgd: 1 (at the grid's edge)" in out and out.count("edge") == 1
    assert (
        "stage 2: python -m experiments.finetune_classification --dataset toy --n-val 1000 "
        "--steps 10 --optimizers adamw scaled_adamw lora_rite reflora_adamw sgd scaled_sgd "
        "--lrs adamw=0.001,0.0032,0.01 scaled_adamw=0.0032,0.01 lora_rite=0.001 "
        "reflora_adamw=0.0032 sgd=0.032 scaled_sgd=1 --seeds 100 101"
    ) in out
    assert out.rstrip().endswith("--out results/prereg/stage2/toy")
    assert "--seeds 100 101 102 103 104 105 106 107 108 109 110 111 112" in out
    cf.main(["rates", "--contingency", "--stage1", str(tmp_path)])
    out = capsys.readouterr().out
    assert "--seeds 100 101 102 103 104 105 106 107 108 109 110 111 --out" in out
    # A stage 1 that stopped between cells (no RefLoRA at its last rate) chooses nothing.
    rows = [r for r in _full_stage1(BEST) if (r["optimizer"], r["lr"]) != ("sgd", 1.0)]
    ft._append(tmp_path / "partial.csv", ft.RUN_FIELDS, rows)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial.csv").rename(tmp_path / "partial" / "runs.csv")
    with pytest.raises(ValueError, match="stage 1 has no sgd at 1: rates are chosen on the whole"):
        cf.main(["rates", "--stage1", str(tmp_path / "partial")])


def test_the_analysis_refuses_what_the_design_does_not_allow(tmp_path):
    # A stage 1 without a validation split cannot choose rates.
    ft._append(
        tmp_path / "runs.csv",
        ft.RUN_FIELDS,
        [_run("adamw", 1e-3, 0, 0.8) | {"val_acc": float("nan")}],
    )
    with pytest.raises(
        ValueError, match="no validation accuracy for adamw: the sweep has no validation split"
    ):
        cf.chosen_rates(tmp_path)
    # Nor one whose cells miss a seed (a sweep stopped halfway).
    (tmp_path / "partial").mkdir()
    rows = [_run("adamw", lr, s, 0.8) for lr, n in ((1e-3, 3), (1e-2, 2)) for s in range(n)]
    ft._append(tmp_path / "partial" / "runs.csv", ft.RUN_FIELDS, rows)
    with pytest.raises(ValueError, match=r"adamw at 0.01 has seeds \[0, 1\], not 0, 1 and 2"):
        cf.chosen_rates(tmp_path / "partial")
    # Stage 2 needs one setting, each seed once, and the pre-registered seeds.
    cell = [_run("adamw", 1e-3, s, 0.8) for s in range(100, 120)]
    cf.check_stage2(cell)
    cf.check_stage2(cell[:12])  # the 12-seed contingency
    with pytest.raises(ValueError, match="seeds"):
        cf.check_stage2(cell[:10])
    with pytest.raises(ValueError, match="twice for a seed"):
        cf.check_stage2([*cell, cell[0]])
    with pytest.raises(ValueError, match="mixes runs of 2 settings"):
        cf.check_stage2([*cell[1:], cell[0] | {"settings": "steps=100"}])
    # Holm's correction is over the pre-registered family: both datasets.
    with pytest.raises(ValueError, match="4 tests, not the pre-registered 8"):
        cf.decide([{"family": "primary", "p": 0.01}] * 4 + [{"family": "secondary", "p": 0.5}] * 8)
    with pytest.raises(SystemExit):
        cf.main(["report", "--dataset", "rotten_tomatoes", "--stage1", "x", "--stage2", "y"])


def test_report_writes_each_cell_and_each_hypothesis(tmp_path, monkeypatch):
    import types

    # Rotten Tomatoes as it came out: scaled AdamW's rate is AdamW's +1; R8 with them equal.
    best = {"rotten_tomatoes": BEST, "reuters_r8": BEST | {"scaled_adamw": 1e-3}}
    argv = ["report", "--out", str(tmp_path / "report.md")]
    stage2 = {}
    for name in cf.DATASETS:
        folder = tmp_path / name
        (folder / "stage1").mkdir(parents=True)
        (folder / "stage2").mkdir()
        ft._append(folder / "stage1" / "runs.csv", ft.RUN_FIELDS, _full_stage1(best[name], name))
        chosen = {o: {"lr": lr} for o, lr in best[name].items()}
        effects = {(o, lr): 1.0 * (o == "scaled_adamw")
                   for o, lrs in cf.stage2_lrs(chosen).items() for lr in lrs}  # fmt: skip
        rows = [r | {"dataset": name} for r in _stage2(effects, {("adamw", 0.01, 100)})]
        ft._append(folder / "stage2" / "runs.csv", ft.RUN_FIELDS, rows)
        stage2[name] = rows
        argv += ["--dataset", name, "--stage1", str(folder / "stage1")]
        argv += ["--stage2", str(folder / "stage2")]
    test_labels = types.SimpleNamespace(test_labels=np.array([0, 0, 0, 1]))  # chance 75%
    monkeypatch.setattr("experiments.data.datasets.load", lambda name: test_labels)
    cf.main(argv)
    report = (tmp_path / "report.md").read_text()
    rows = stage2["reuters_r8"]
    acc = [100 * r["eval_acc"] for r in rows if (r["optimizer"], r["lr"]) == ("adamw", 0.01)]
    acc[0] = 75.0  # the diverged run scores the majority class
    mean, sd = np.mean(acc), np.std(acc, ddof=1)
    assert f"| reuters_r8 | adamw | 0.01 | +2 | 20 | {mean:.2f} ± {sd:.2f} | 1 |" in report
    assert "| rotten_tomatoes | scaled_adamw | 0.0032 | chosen, +1 | 20 |" in report
    assert "| reuters_r8 | scaled_adamw | 0.001 | chosen | 20 |" in report
    assert "| reuters_r8 | scaled_adamw | 0.0032 | +1 | 20 |" in report
    assert report.count("| chosen") == 2 * 6 and report.count("+1 |") == 2 * 2
    assert report.count("| H1 scaled_sgd > sgd |") == 2  # one per dataset
    assert len([line for line in report.splitlines() if "| H" in line]) == 16
    # A rate the design does not run is an error, not a row.
    extra = [_run("sgd", 1.0, s, 0.7) for s in range(100, 120)]
    chosen = {o: {"lr": lr} for o, lr in best["reuters_r8"].items()}
    with pytest.raises(ValueError, match="stage 2 has sgd at 1, a rate the design does not run"):
        cf.cell_rows("toy", chosen, [*rows, *extra], 0.5)


def test_report_refuses_a_stage2_that_stage1_did_not_make():
    chosen = {o: {"lr": lr} for o, lr in BEST.items()}
    first = _full_stage1(BEST)
    cells = {(o, lr): 0.0 for o, lrs in cf.stage2_lrs(chosen).items() for lr in lrs}
    rows = _stage2(cells)
    cf.check_design("toy", chosen, first, rows)
    lacking = [r for r in rows if r["optimizer"] != "lora_rite"]
    with pytest.raises(ValueError, match=r"stage 2 lacks lora_rite at 0\.001 and has none beyond"):
        cf.check_design("toy", chosen, first, lacking)
    with pytest.raises(ValueError, match="stage 2 of reuters_r8 holds runs of"):
        cf.check_design("reuters_r8", chosen, [r | {"dataset": "reuters_r8"} for r in first], rows)
    with pytest.raises(ValueError, match="other settings than stage 1"):
        cf.check_design("toy", chosen, first, [r | {"settings": "steps=80"} for r in rows])
    # One seed count for the design: 12-seed cells beside 20-seed ones are refused.
    twelve = [r for r in rows if r["optimizer"] != "sgd" or r["seed"] < 112]
    with pytest.raises(ValueError, match="mixes cells of 20 and of 12 seeds"):
        cf.check_stage2(twelve)


def test_validation_rows_mark_the_choice_and_divergence():
    rows = [_run("adamw", lr, s, acc) for lr, acc in ((1e-3, 0.8), (1e-2, 0.9)) for s in (0, 1, 2)]
    rows += [_run("sgd", 0.1, s, 0.7, diverged=s == 1) for s in (0, 1, 2)]
    chosen = {"adamw": {"lr": 1e-2}, "sgd": {"lr": 0.1}}
    assert cf.validation_rows("toy", rows, chosen) == [
        "| toy | 0.001 | 0.01 | 0.1 |",
        "|---|---|---|---|",
        "| adamw | 80.0 ± 0.0 | **90.0 ± 0.0** |  |",
        "| sgd |  |  | div |",
    ]


def test_the_results_page_quotes_the_committed_design():
    """docs/experiments/confirmatory.md and results/prereg/report.md are the analysis of the
    committed stage 1 and stage 2 runs, as `confirmatory report` makes it."""
    from pathlib import Path

    from experiments.data.datasets import DatasetNotInstalledError

    root = Path(__file__).resolve().parents[2]
    designs = [
        (d, root / "results" / "prereg" / "stage1" / d, root / "results" / "prereg" / "stage2" / d)
        for d in cf.DATASETS
    ]
    try:
        cells, decided = cf.analyse(designs)
    except DatasetNotInstalledError as err:
        pytest.skip(str(err))
    report = cf.report_lines(cells, decided)
    assert (root / "results" / "prereg" / "report.md").read_text().splitlines() == report
    assert sum(line.startswith("| rotten_tomatoes | H") for line in report) == 8
    lines = [line for line in report if line.startswith("| ") and "hypothesis" not in line]
    for _, stage1, _ in designs:
        runs = ft._read_runs(stage1 / "runs.csv")
        lines += cf.validation_rows(runs[0]["dataset"], runs, cf.chosen_rates(stage1))[2:]
    page = (root / "docs" / "experiments" / "confirmatory.md").read_text()
    assert [line for line in lines if line not in page] == []
    # README's line quotes the primary tests' mean differences (and R8's H3 interval).
    rows = {  # (dataset, "H1" / "H2+1" / "H2+2" / "H3") -> decide's row
        (r["dataset"], r["hypothesis"][:2] + r["hypothesis"].partition(" at ")[2][:2]): r
        for r in decided
        if r["family"] == "primary"
    }

    def mean(dataset, key, sign=True, digits=2):
        x = rows[dataset, key]["mean"]
        return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"

    rt, r8 = "rotten_tomatoes", "reuters_r8"
    lo, hi = rows[r8, "H3"]["lo"], rows[r8, "H3"]["hi"]
    quoted = [
        f"SGD at tuned rates ({mean(r8, 'H1')} points on R8, "
        f"{mean(rt, 'H1', sign=False)} on Rotten Tomatoes;",
        f"({mean(rt, 'H2+1', digits=1)} and {mean(rt, 'H2+2', digits=1)} points one and two steps",
        f"{mean(r8, 'H2+1', digits=1)} and {mean(r8, 'H2+2', digits=1)} on R8, all four supported",
        f"(on R8 not shown: {mean(r8, 'H3')}, interval {lo:.2f} to {hi:.2f})",
    ]
    readme = " ".join((root / "README.md").read_text().split())
    assert [q for q in quoted if q not in readme] == []
    verdicts = {k: v["verdict"] for k, v in rows.items()}
    assert [verdicts[d, h] for d in (rt, r8) for h in ("H1", "H2+1", "H2+2", "H3")] == [
        "not supported", "supported", "supported", "supported",
        "not supported", "supported", "supported", "not supported",
    ]  # fmt: skip
