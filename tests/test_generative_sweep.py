"""The generative sweep's bookkeeping, with a fake run function: resumable files, sample sd."""

from __future__ import annotations

import csv
import math
import types

import numpy as np
import pytest

import experiments.generative_finetune as gen


class FakeRuns:
    """Stands in for run_one: records calls, and can fail at a given call to mimic a crash."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, task, args, name, lr, seed, bar=None):
        if len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        self.calls.append((name, lr, seed))
        trained = name not in gen.BASELINES
        bleu = 10.0 + 1000 * lr + seed
        return {
            "valid_loss": 1.0 - lr,
            "bleu": bleu,
            "chrf": 2 * bleu,
            "final_train_loss": 0.5 if trained else float("nan"),
            "tokens_per_s": 100.0,
            "decode_s": 0.1,
            "peak_mem_mb": 1.0,
            "rank": args.rank if trained else 0,
            "batch_size": args.batch_size if trained else 0,
            "n_test": 2,
            "curve": [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.8}] if trained else [],
            "samples": [
                {"ref": f"Gen 1:{i}", "kjv": "thou", "web": "you", "output": f"{name} {i}"}
                for i in (1, 2)
            ],
        }


@pytest.fixture
def fake(monkeypatch):
    """main() with no model: prepare and the splits are stubbed, run_one is a FakeRuns."""
    prepared = []

    def prepare(splits, **kw):
        prepared.append(kw)
        return types.SimpleNamespace(train=[0] * 4, valid=[0] * 2, test_pairs=[0] * 2)

    monkeypatch.setattr(gen, "prepare", prepare)
    monkeypatch.setattr(gen.bible, "kjv_web_splits", lambda seed: {})

    def use(runs):
        monkeypatch.setattr(gen, "run_one", runs)
        return runs

    use.prepared = prepared
    return use


def _argv(out, *extra):
    return [
        "--optimizers", "adamw", "scaled_adamw", "--lrs", "adamw=1e-3,3e-3",
        "scaled_adamw=1e-3,3e-3", "--steps", "2", "--out", str(out), *extra,
    ]  # fmt: skip


BASE = [("copy_kjv", 0.0, 0), ("untuned", 0.0, 0)]
TRAINED = [(o, lr, 0) for o in ("adamw", "scaled_adamw") for lr in (1e-3, 3e-3)]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_appends_each_run_and_resumes(tmp_path, fake, capsys):
    crashing = fake(FakeRuns(fail_at=4))
    with pytest.raises(KeyboardInterrupt):
        gen.main(_argv(tmp_path))
    # The four finished runs (2 baselines, 2 trained) are on disk with their curves and samples.
    assert len(_rows(tmp_path / "runs.csv")) == 4
    assert len(_rows(tmp_path / "curves.csv")) == 2 * 2
    assert len(_rows(tmp_path / "samples.csv")) == 4 * 2
    assert crashing.calls == BASE + TRAINED[:2]
    again = fake(FakeRuns())
    gen.main(_argv(tmp_path))
    assert again.calls == TRAINED[2:]
    assert "resuming: 4 of 6 runs already in" in capsys.readouterr().out
    runs = _rows(tmp_path / "runs.csv")
    assert [(r["optimizer"], float(r["lr"]), int(r["seed"])) for r in runs] == BASE + TRAINED
    assert len(_rows(tmp_path / "curves.csv")) == 4 * 2
    samples = _rows(tmp_path / "samples.csv")
    assert len(samples) == 6 * 2 and samples[-1]["output"] == "scaled_adamw 2"
    summary = (tmp_path / "summary.md").read_text()
    assert "| scaled_adamw | 0.003 | 1 |" in summary
    assert (tmp_path / "bleu_vs_lr.png").exists()
    # The same command again runs nothing and does not even load the model.
    third = fake(FakeRuns())
    n_prepared = len(fake.prepared)
    gen.main(_argv(tmp_path))
    assert third.calls == [] and len(fake.prepared) == n_prepared
    assert len(_rows(tmp_path / "runs.csv")) == 6
    assert (tmp_path / "summary.md").read_text() == summary


def test_changed_settings_rerun_trained_runs_only(tmp_path, fake):
    fake(FakeRuns())
    gen.main(_argv(tmp_path))
    other = fake(FakeRuns())
    gen.main(_argv(tmp_path, "--rank", "8"))
    # The baselines do not depend on the rank: only the trained runs are new.
    assert other.calls == TRAINED
    assert len(_rows(tmp_path / "runs.csv")) == 2 + 2 * 4
    newer = fake(FakeRuns())
    gen.main(_argv(tmp_path, "--n-test", "8"))
    assert newer.calls == BASE + TRAINED


def test_old_runs_csv_is_an_error(tmp_path, fake):
    fake(FakeRuns())
    (tmp_path / "runs.csv").write_text("optimizer,lr,valid_loss\n")
    with pytest.raises(ValueError, match="another --out"):
        gen.main(_argv(tmp_path))


def test_summary_uses_sample_sd_over_seeds():
    runs = [
        {"optimizer": "adamw", "lr": 1e-3, "seed": s, "valid_loss": v, "bleu": b, "chrf": 1.0}
        | {"tokens_per_s": 1.0, "peak_mem_mb": 1.0}
        for s, v, b in ((0, 1.0, 10.0), (1, 2.0, 12.0), (2, 3.0, float("nan")))
    ] + [
        {"optimizer": "untuned", "lr": 0.0, "seed": 0, "valid_loss": 4.0, "bleu": 5.0}
        | {"chrf": 1.0, "tokens_per_s": float("nan"), "peak_mem_mb": 1.0}
    ]
    adamw, untuned = gen.summarize(runs)
    assert (adamw["optimizer"], adamw["seeds"]) == ("adamw", 3)
    assert adamw["valid_loss"] == pytest.approx(2.0)
    assert adamw["valid_loss_sd"] == pytest.approx(1.0)  # ddof=1: sqrt(2 / 2)
    assert adamw["bleu"] == pytest.approx(11.0)  # the NaN (diverged) run is left out
    assert adamw["bleu_sd"] == pytest.approx(np.sqrt(2.0))
    assert adamw["chrf_sd"] == 0.0
    assert untuned["seeds"] == 1 and math.isnan(untuned["bleu_sd"])
    assert math.isnan(untuned["tokens_per_s"])
