"""The generative sweep's bookkeeping and statistics, with a fake run function: resumable files,
sample sd, length filtering, paired bootstrap comparisons."""

from __future__ import annotations

import csv
import math
import re
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
        # Held-out NLL per verse: scaled_adamw is 0.1 nat per token lower on every verse.
        better = 0.1 if name == "scaled_adamw" else 0.0
        nll = [(1.0 - lr + 0.01 * seed + 0.05 * i - better) * 10 for i in range(4)]
        return {
            "valid_loss": 1.0 - lr,
            "test_loss": 1.1 - lr if name != "copy_kjv" else math.nan,
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
            "valid": [
                {"ref": f"Exo 1:{i}", "nll": x, "tokens": 10}
                for i, x in enumerate(nll)
                if name != "copy_kjv"
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


def _seeds(*seeds):
    return ["--seeds", *map(str, seeds)]


BASE = [("copy_kjv", 0.0, 0), ("untuned", 0.0, 0)]
TRAINED = [(o, lr, 0) for lr in (1e-3, 3e-3) for o in ("adamw", "scaled_adamw")]


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_appends_each_run_and_resumes(tmp_path, fake, capsys):
    crashing = fake(FakeRuns(fail_at=4))
    with pytest.raises(KeyboardInterrupt):
        gen.main(_argv(tmp_path, *_seeds(0)))
    # The four finished runs (2 baselines, 2 trained) are on disk with their curves and samples.
    assert len(_rows(tmp_path / "runs.csv")) == 4
    assert len(_rows(tmp_path / "curves.csv")) == 2 * 2
    assert len(_rows(tmp_path / "samples.csv")) == 4 * 2
    assert crashing.calls == BASE + TRAINED[:2]
    again = fake(FakeRuns())
    gen.main(_argv(tmp_path, *_seeds(0)))
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
    gen.main(_argv(tmp_path, *_seeds(0)))
    assert third.calls == [] and len(fake.prepared) == n_prepared
    assert len(_rows(tmp_path / "runs.csv")) == 6
    assert (tmp_path / "summary.md").read_text() == summary


def test_changed_settings_rerun_trained_runs_only(tmp_path, fake):
    fake(FakeRuns())
    gen.main(_argv(tmp_path, *_seeds(0)))
    other = fake(FakeRuns())
    gen.main(_argv(tmp_path, "--rank", "8", *_seeds(0)))
    # The baselines do not depend on the rank: only the trained runs are new.
    assert other.calls == TRAINED
    assert len(_rows(tmp_path / "runs.csv")) == 2 + 2 * 4
    newer = fake(FakeRuns())
    gen.main(_argv(tmp_path, "--n-test", "8", *_seeds(0)))
    assert newer.calls == BASE + TRAINED


def test_old_runs_csv_is_an_error(tmp_path, fake):
    fake(FakeRuns())
    (tmp_path / "runs.csv").write_text("optimizer,lr,valid_loss\n")
    with pytest.raises(ValueError, match="another --out"):
        gen.main(_argv(tmp_path, *_seeds(0)))


def test_summary_uses_sample_sd_over_seeds():
    runs = [
        {"optimizer": "adamw", "lr": 1e-3, "seed": s, "valid_loss": v, "bleu": b, "chrf": 1.0}
        | {"test_loss": v + 0.5, "tokens_per_s": 1.0, "peak_mem_mb": 1.0}
        for s, v, b in ((0, 1.0, 10.0), (1, 2.0, 12.0), (2, 3.0, float("nan")))
    ] + [
        {"optimizer": "untuned", "lr": 0.0, "seed": 0, "valid_loss": 4.0, "bleu": 5.0}
        | {"test_loss": 4.5, "chrf": 1.0, "tokens_per_s": float("nan"), "peak_mem_mb": 1.0}
    ]
    adamw, untuned = gen.summarize(runs)
    assert (adamw["optimizer"], adamw["seeds"]) == ("adamw", 3)
    assert adamw["valid_loss"] == pytest.approx(2.0)
    assert adamw["valid_loss_sd"] == pytest.approx(1.0)  # ddof=1: sqrt(2 / 2)
    assert adamw["test_loss"] == pytest.approx(2.5)
    assert adamw["bleu"] == pytest.approx(11.0)  # the NaN (diverged) run is left out
    assert adamw["bleu_sd"] == pytest.approx(np.sqrt(2.0))
    assert adamw["chrf_sd"] == 0.0
    assert untuned["seeds"] == 1 and math.isnan(untuned["bleu_sd"])
    assert math.isnan(untuned["tokens_per_s"])


def test_two_seeds_run_seed_by_seed_and_report_paired_differences(tmp_path, fake):
    runs = fake(FakeRuns())
    gen.main(_argv(tmp_path, *_seeds(0, 1)))
    trained = [c for c in runs.calls if c[0] not in gen.BASELINES]
    assert trained == TRAINED + [(o, lr, 1) for _, lr, o in [(0, *t[1::-1]) for t in TRAINED]]
    paired = _rows(tmp_path / "paired.csv")
    loss = [
        r
        for r in paired
        if r["metric"] == "valid_loss" and (r["lr_treatment"], r["lr_control"]) == ("0.001",) * 2
    ]
    (row,) = loss
    # scaled_adamw's NLL is 1 lower per verse of 10 tokens on every verse and seed: the
    # token-weighted loss is 0.1 lower, with no spread over verses or seeds.
    assert (row["treatment"], row["control"], row["seeds"]) == ("scaled_adamw", "adamw", "2")
    for k in ("diff", "boot_lo", "boot_hi", "seed_lo", "seed_hi"):
        assert float(row[k]) == pytest.approx(0.1, abs=1e-9), k
    assert row["verdict"] == "scaled_adamw 0.001 better"
    # Both optimizers are best at their top rate: not bracketed, and said so.
    summary = (tmp_path / "summary.md").read_text()
    assert re.search(r"\| adamw \| 0.003 \| [0-9.]+ \| not swept \| no: highest rate \|", summary)
    assert len(loss) == 1 and len(paired) == len({tuple(r.values()) for r in paired})
    # The BLEU comparisons against copying the KJV verse are there for each best rate.
    vs_copy = {(r["treatment"], r["metric"]) for r in paired if r["control"] == "copy_kjv"}
    assert vs_copy == {(o, m) for o in ("adamw", "scaled_adamw") for m in ("bleu", "chrf")}
    # Between two trained optimizers every metric also gets the interval over seeds (training
    # noise); against copying the verse there is no second run to pair with.
    for r in paired:
        seeded = r["control"] != "copy_kjv"
        assert (r["seed_lo"] not in ("", "nan")) == seeded, (r["metric"], r["control"])


class _WordTokenizer:
    """One token per word; the chat prompt adds two."""

    eos_id = 0

    def encode(self, text):
        return [1] * len(text.split())

    def chat_prompt(self, text, system=None):
        return f"<s> {text} </s>"


def test_fitting_draws_exactly_n_among_the_pairs_that_fit():
    pair = lambda i, n: types.SimpleNamespace(source=f"v{i}", target=" ".join(["w"] * n))
    # Prompt: 2 + "KJV: v{i}" = 4 tokens; + target + eos <= 10 keeps targets of <= 5 words.
    pairs = [pair(i, n) for i, n in enumerate([1, 9, 5, 6, 2, 3, 20, 4])]
    tok = _WordTokenizer()
    got = gen.fitting(tok, pairs, 3, 10, np.random.default_rng(0))
    assert len(got) == 3
    assert all(len(p.target.split()) <= 5 for p in got)
    assert [pairs.index(p) for p in got] == sorted(pairs.index(p) for p in got)
    everyone = gen.fitting(tok, pairs, None, 10, np.random.default_rng(0))
    assert [p.source for p in everyone] == ["v0", "v2", "v4", "v5", "v7"]
    with pytest.raises(ValueError, match="Only 5 verse pairs fit in max_length=10; 6 asked"):
        gen.fitting(tok, pairs, 6, 10, np.random.default_rng(0))


def test_corpus_score_from_sentence_statistics_is_sacrebleu_corpus_score():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the cat sat on the mat", "God said let there be light", "and it was so", "yes"]
    refs = ["the cat sat on a mat", "God said, let there be light", "it was so", "no"]
    metrics = gen._sacrebleu_metrics()
    for name, full in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        stats = gen.sentence_statistics(metrics[name], hyps, refs)
        assert stats.shape[0] == len(hyps)
        assert gen.corpus_score(metrics[name], stats) == pytest.approx(
            full(hyps, [refs]).score, abs=1e-9
        )
        idx = np.array([0, 0, 2])
        assert gen.corpus_score(metrics[name], stats[idx]) == pytest.approx(
            full([hyps[i] for i in idx], [[refs[i] for i in idx]]).score, abs=1e-9
        )


def test_a_second_command_extends_the_report(tmp_path, fake):
    fake(FakeRuns())
    gen.main(_argv(tmp_path, *_seeds(0)))
    more = fake(FakeRuns())
    extra = ["--optimizers", "adamw", "scaled_adamw", "--lrs", "adamw=1e-2", "scaled_adamw=1e-2"]
    gen.main([*extra, "--steps", "2", "--out", str(tmp_path), *_seeds(0)])
    assert more.calls == [("adamw", 1e-2, 0), ("scaled_adamw", 1e-2, 0)]
    commands = (tmp_path / "command.txt").read_text().splitlines()
    assert len(commands) == 2 and "adamw=1e-2" in commands[1]
    summary = (tmp_path / "summary.md").read_text()
    for lr in ("0.001", "0.003", "0.01"):
        assert f"| scaled_adamw | {lr} | 1 |" in summary, lr
    # Best rate now 1e-2 (the fake's loss falls with the rate): still the top of the grid.
    assert re.search(r"\| adamw \| 0.01 \| [0-9.]+ \| not swept \| no: highest rate \|", summary)
    assert summary.count("| copy_kjv | 0 | 1 |") == 1  # the baseline row once, not per command


def test_a_rate_with_a_diverged_seed_is_not_the_best():
    # The summary's mean leaves the diverged seed out (1.10 at 3e-3); the best rate must not.
    runs = [
        {"optimizer": "adamw", "lr": lr, "seed": s, "valid_loss": loss}
        | {m: 1.0 for m in gen.SUMMARY_METRICS if m != "valid_loss"}
        for lr, losses in ((1e-3, (1.20, 1.20)), (3e-3, (1.10, float("nan"))))
        for s, loss in enumerate(losses)
    ]
    assert gen.best_rates(runs) == {"adamw": 1e-3}


def test_a_diverged_run_gives_no_verdict():
    def verses(nll):
        return {
            "valid_refs": ["a", "b"],
            "nll": np.array(nll),
            "tokens": np.ones(2),
            "test_refs": [],
        }

    data = {
        ("scaled_adamw", 1e-3, 0): verses([1.0, 1.0]),
        ("adamw", 1e-3, 0): verses([float("nan"), 2.0]),
    }
    row = gen.compare(data, [], ("scaled_adamw", 1e-3), ("adamw", 1e-3), "valid_loss")
    assert row["verdict"] == "no interval (a run diverged)"  # was "adamw 0.001 better"
