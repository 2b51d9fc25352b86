"""The pre-registered generative design's analysis, on synthetic runs whose answers are known."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

import experiments.finetune_classification as ft
import experiments.generative_analysis as ga
import experiments.generative_finetune as gen

SETTINGS = "steps=200;n_valid=256"


def _run(o, lr, seed, valid, test=None, bleu=40.0, settings=SETTINGS):
    return {"dataset": "kjv_web", "optimizer": o, "lr": lr, "seed": seed, "steps": 200,
            "valid_loss": valid, "test_loss": valid if test is None else test, "bleu": bleu,
            "chrf": 60.0, "tokens_per_s": 1.0, "peak_mem_mb": 1.0,
            "settings": settings}  # fmt: skip


def _untuned(test=2.0, bleu=14.0):
    return _run("untuned", 0.0, 0, 2.0, test, bleu, settings="n_valid=256")


def _stage1(path, best):
    """Every optimizer over its pre-registered grid, valid loss lowest at ``best[o]``."""
    rows = [_untuned()]
    for o, grid in ga.GRIDS.items():
        for lr in grid:
            dist = abs(math.log10(lr) - math.log10(best[o]))
            rows += [_run(o, lr, s, 1.0 + dist + 0.01 * s) for s in ga.STAGE1_SEEDS]
    ft._append(path / "runs.csv", gen.RUN_FIELDS, rows)


def test_rates_are_chosen_on_the_valid_loss_and_an_edge_is_extended_twice_at_most(tmp_path):
    best = {"adamw": 3.2e-3, "scaled_adamw": 1e-2, "sgd": 3.2, "scaled_sgd": 0.32}
    _stage1(tmp_path, best)
    read = lambda: ft._read_runs(tmp_path / "runs.csv", gen.RUN_FIELDS, legacy=False)
    chosen = ga.chosen_rates(read())
    assert {o: c["lr"] for o, c in chosen.items()} == best
    assert [o for o, c in chosen.items() if c["edge"]] == ["sgd"]
    argv = ga.extension_argv(tmp_path, chosen)
    assert argv[:5] == ["--optimizers", "sgd", "--lrs", "sgd=10", "--seeds"]
    assert argv[-2:] == ["--out", str(tmp_path)]
    # SGD keeps improving upwards: 10, then 32, then the rule stops extending.
    for lr, expected in ((10.0, "sgd=32"), (32.0, None)):
        ft._append(tmp_path / "runs.csv", gen.RUN_FIELDS,
                   [_run("sgd", lr, s, 0.5 - lr / 100) for s in ga.STAGE1_SEEDS])  # fmt: skip
        chosen = ga.chosen_rates(read())
        argv = ga.extension_argv(tmp_path, chosen)
        assert (argv[3] if argv else None) == expected
    assert chosen["sgd"] == {"lr": 32.0, "edge": True, "grid": [*ga.SGD_GRID, 10.0, 32.0]}
    stage2 = ga.stage2_argv(tmp_path, chosen)
    assert stage2[: stage2.index("--seeds")] == [
        "--optimizers", "adamw", "scaled_adamw", "sgd", "scaled_sgd", "--lrs",
        "adamw=0.0032,0.01,0.032", "scaled_adamw=0.01,0.032", "sgd=32", "scaled_sgd=0.32",
    ]  # fmt: skip
    assert "--seeds 100 101 102 103 104 105 106 107 --steps 200 --n-valid 256 --n-test 256" in (
        " ".join(stage2)
    )
    stage1 = " ".join(ga.stage1_argv(tmp_path, read()))
    assert "sgd=0.01,0.032,0.1,0.32,1,3.2,10,32 scaled_sgd=0.01,0.032,0.1,0.32,1,3.2" in stage1
    assert "--seeds 0 1 2 --steps 200 --n-valid 256 --n-test 256" in stage1
    assert stage2[-1] == str(tmp_path.parent / "stage2")


def test_a_rate_with_a_diverged_seed_is_never_chosen_nor_one_missing_a_seed(tmp_path):
    rows = [_run("adamw", lr, s, 1.0 - lr) for lr in (1e-3, 1e-2) for s in (0, 1, 2)]
    rows[3]["valid_loss"] = math.nan  # 1e-2 is better on average but one seed diverged
    assert ga.chosen_rates(rows)["adamw"]["lr"] == 1e-3
    with pytest.raises(ValueError, match=r"adamw at 0.01 with seeds \[0, 2\]"):
        ga.chosen_rates(rows[:4] + rows[5:])
    with pytest.raises(ValueError, match="stage 1 mixes runs of 2 settings"):
        ga.chosen_rates([*rows[:5], _run("adamw", 1e-2, 2, 0.5, settings="steps=80")])


def _stage2(effect_sgd, effect_above, noise=0.02, diverge=None):
    """Stage 2 with known effects: scaled SGD's test loss lower by ``effect_sgd``, scaled
    AdamW's above AdamW's rate by ``effect_above``; BLEU moves the other way, 10x."""
    rng = np.random.default_rng(0)
    cells = {("sgd", 0.32): 0.0, ("scaled_sgd", 0.1): -effect_sgd, ("adamw", 3.2e-3): 0.0,
             ("adamw", 1e-2): 0.0, ("adamw", 3.2e-2): 0.0, ("scaled_adamw", 1e-2): -effect_above,
             ("scaled_adamw", 3.2e-2): -effect_above}  # fmt: skip
    rows = [_untuned(test=2.5, bleu=3.0)]
    for s in ga.STAGE2_SEEDS:
        shared = rng.normal(0, 0.1)  # a seed's batches help every optimizer alike
        for (o, lr), shift in cells.items():
            loss = 1.2 + shared + shift + rng.normal(0, noise)
            rows.append(_run(o, lr, s, loss, loss, bleu=50 - 10 * loss))
    if diverge is not None:
        r = next(r for r in rows if (r["optimizer"], r["lr"], r["seed"]) == diverge)
        r["test_loss"] = math.nan
    return rows


RATES = (("adamw", 3.2e-3), ("scaled_adamw", 1e-2), ("sgd", 0.32), ("scaled_sgd", 0.1))
CHOSEN = {o: {"lr": lr} for o, lr in RATES}


def test_family_g_finds_the_effects_that_are_there_and_only_those():
    table = ga.family_g(CHOSEN, _stage2(effect_sgd=0.1, effect_above=0.0))
    got = {(r["test"], r["metric"]): r for r in table}
    assert [r["test"] for r in table] == ["G1", "G2a", "G2b"] * 2
    g1 = got["G1", "test_loss"]
    assert (g1["treatment"], g1["control"], g1["n"]) == ("scaled_sgd@0.1", "sgd@0.32", 8)
    assert g1["mean"] == pytest.approx(0.1, abs=0.02) and g1["lo"] > 0
    assert got["G1", "bleu"]["mean"] == pytest.approx(1.0, abs=0.2)  # 10x, same sign
    assert got["G2a", "test_loss"]["control"] == "adamw@0.01"
    assert got["G2b", "bleu"]["control"] == "adamw@0.032"
    assert [r["verdict"] for r in table] == ["supported", "not supported", "not supported"] * 2
    # Holm over the six tests together: one family, not two of three.
    assert [r["p_holm"] for r in table] == ga.holm([r["p"] for r in table])
    # An effect in the wrong direction is not support.
    worse = ga.family_g(CHOSEN, _stage2(effect_sgd=-0.1, effect_above=0.0))
    assert worse[0]["mean"] < 0 and worse[0]["p_holm"] < 0.05
    assert worse[0]["verdict"] == "not supported"


def test_six_tests_hold_a_p_value_to_a_stricter_level_than_three(monkeypatch):
    # G1's raw p-value between 0.05 / 6 and 0.05 / 3 is supported by a family of three, not six.
    rows = _stage2(effect_sgd=0.1, effect_above=0.0)
    monkeypatch.setattr(ga, "difference_test", lambda d: 0.012 if d.mean() > 0.05 else 0.9)
    table = ga.family_g(CHOSEN, rows)
    assert [r["p_holm"] for r in table] == pytest.approx([0.072, 1, 1, 0.072, 1, 1])
    assert {r["verdict"] for r in table} == {"not supported"}


def test_a_cell_stage_2_lacks_is_an_error_not_a_verdict():
    rows = _stage2(effect_sgd=0.1, effect_above=0.0)
    other = CHOSEN | {"sgd": {"lr": 1.0}}  # a stage 1 whose SGD rate stage 2 did not run
    with pytest.raises(ValueError, match=r"G1: scaled_sgd at 0\.1 and sgd at 1 share 0 seeds"):
        ga.family_g(other, rows)


def test_a_diverged_run_scores_the_untuned_model():
    rows = _stage2(effect_sgd=0.0, effect_above=0.0, diverge=("adamw", 3.2e-2, 103))
    untuned_loss = ga.scores(rows, "adamw", 3.2e-2, "test_loss")[103]
    assert untuned_loss == -2.5  # signed: higher is better
    assert ga.scores(rows, "adamw", 3.2e-2, "bleu")[103] == 3.0
    with pytest.raises(ValueError, match="no untuned row"):
        ga.scores(rows[1:], "adamw", 3.2e-2, "bleu")


def test_stage2_must_have_the_preregistered_seeds_and_stage_1s_settings():
    rows, stage1 = _stage2(0.0, 0.0), [_run("sgd", 0.32, 0, 1.0)]
    ga.check_stage2(rows, stage1)
    with pytest.raises(ValueError, match="seeds"):
        ga.check_stage2([r for r in rows if r["seed"] != 107], stage1)
    with pytest.raises(ValueError, match="settings"):
        ga.check_stage2([*rows, _run("sgd", 0.32, 100, 1.0, settings="steps=80")], stage1)
    with pytest.raises(ValueError, match="other settings"):
        ga.check_stage2(rows, [_run("sgd", 0.32, 0, 1.0, settings="steps=80")])


def test_design_runs_both_stages_and_reports(tmp_path, monkeypatch):
    """The whole design with a fake run: stage 1 over the grids, SGD's grid extended twice (its
    loss keeps falling with the rate), stage 2, the report. It is stopped once inside the first
    extension (rate 10 has seed 0 only) and resumed; a last call runs nothing."""
    best = {"adamw": 3.2e-3, "scaled_adamw": 1e-2, "scaled_sgd": 3.2e-2}
    calls, stop = [], [("sgd", 10.0, 1)]

    def run_one(task, args, name, lr, seed, bar=None):
        if (name, lr, seed) in stop:
            stop.clear()
            raise KeyboardInterrupt
        calls.append((name, lr, seed))
        noise = 0.01 * ((seed * (len(name) + 3)) % 5)  # differs between optimizers
        if name in gen.BASELINES:
            loss = 2.0 if name == "untuned" else math.nan
        elif name == "sgd":
            loss = 1.0 - 0.01 * math.log10(lr) + noise
        else:
            loss = 1.0 + abs(math.log10(lr) - math.log10(best[name])) + noise
            loss -= 0.2 * (name == "scaled_sgd")
        return {"valid_loss": loss, "test_loss": loss, "bleu": 50 - 10 * loss, "chrf": 60.0,
                "final_train_loss": 1.0, "tokens_per_s": 1.0, "decode_s": 0.0,
                "peak_mem_mb": 1.0, "rank": 4, "batch_size": 8, "n_test": 256,
                "curve": [], "samples": [], "valid": []}  # fmt: skip

    monkeypatch.setattr(gen, "run_one", run_one)
    monkeypatch.setattr(gen, "prepare", lambda splits, **kw: types.SimpleNamespace(
        train=[0], valid=[0], test_pairs=[0]))  # fmt: skip
    monkeypatch.setattr(gen.bible, "kjv_web_splits", lambda seed: {})
    with pytest.raises(KeyboardInterrupt):
        ga.main(["design", "--out", str(tmp_path)])
    assert calls[-1] == ("sgd", 10.0, 0)
    ga.main(["design", "--out", str(tmp_path)])
    stage1 = [c for c in calls if c[0] not in gen.BASELINES and c[2] < 100]
    assert {c[1] for c in stage1 if c[0] == "sgd"} == {*ga.SGD_GRID, 10.0, 32.0}
    assert len(stage1) == 3 * (6 * 4 + 2)
    stage2 = {(c[0], c[1]) for c in calls if c[2] >= 100}
    assert stage2 == {("adamw", 3.2e-3), ("adamw", 1e-2), ("adamw", 3.2e-2),
                      ("scaled_adamw", 1e-2), ("scaled_adamw", 3.2e-2), ("sgd", 32.0),
                      ("scaled_sgd", 3.2e-2)}  # fmt: skip
    assert len([c for c in calls if c[2] >= 100]) == 8 * 7
    report = (tmp_path / "stage2" / "report.md").read_text()
    assert "| G1 | scaled_sgd@0.032 vs sgd@32 | test_loss | 8 |" in report
    assert "| G2b | scaled_adamw@0.032 vs adamw@0.032 | bleu | 8 |" in report
    assert report.count("| supported |") == 6
    calls.clear()
    ga.main(["design", "--out", str(tmp_path)])
    assert calls == []
