"""How validation accuracy moves with the training length: the pilot that fixes the length of
the pre-registered fine-tuning sweeps (docs/experiments/preregistration.md).

For each ``--configs`` entry (``optimizer=rate``) and seed, one run of ``--steps`` steps of the
fine-tuning experiment (:mod:`experiments.finetune_classification`, the same model, data, batches
and validation split), evaluated on the validation split every ``--eval-every`` steps. Writes
``lengths.csv`` (one row per evaluation, appended as each run ends; runs already there are
skipped), ``summary.md`` (mean ± sample sd over seeds at each length) and ``command.txt``::

    python -m experiments.training_length --dataset rotten_tomatoes --n-val 1000 \\
        --configs adamw=3.2e-3 sgd=3.2e-2 sgd=3.2e-1 --seeds 0 1 2 3 --steps 500 --eval-every 100
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments import finetune_classification as ft
from experiments.commands import command_line, record_command
from experiments.data import datasets
from experiments.stats import sample_sd

FIELDS = ("optimizer", "lr", "seed", "step", "val_acc", "train_loss")


def run(task: ft.Task, optimizer: str, lr: float, seed: int, steps: int, every: int, kw: dict):
    """Validation accuracy and mean training loss since the last evaluation, every ``every``
    steps of one run."""
    params = ft.init_params(task, seed)
    opt_state = ft.make_optimizer(optimizer, lr, also_train=ft.bert.HEAD, **kw).init(params)
    step = task.train_step(optimizer, **kw)
    rows, losses = [], []
    n = len(task.train["labels"])
    for i, idx in enumerate(ft.batches(n, 16, steps, seed)):
        params, opt_state, loss = step(
            params, opt_state, {k: v[idx] for k, v in task.train.items()}
        )
        losses.append(float(loss))
        if (i + 1) % every == 0:
            acc = ft.evaluate(task, params, split="val") if np.isfinite(losses[-1]) else np.nan
            row = {"optimizer": optimizer, "lr": lr, "seed": seed, "step": i + 1}
            rows.append(row | {"val_acc": acc, "train_loss": float(np.mean(losses[-every:]))})
    return rows


def choose_length(rows: Sequence[dict], points: float = 1.0) -> tuple[int, dict]:
    """The pre-registered rule: the smallest length at which the mean validation accuracy
    (over seeds) of AdamW and of the better of the SGD rates is at most ``points`` below their
    plateau, the mean over the last two lengths; the last length if none qualifies (the runs had
    not converged). Returns the length and each counted configuration's ``{step: mean accuracy
    (%)}`` with its plateau under ``"plateau"``.

    Example:
      >>> rows = [{"optimizer": "adamw", "lr": "1e-3", "seed": s, "step": st, "val_acc": a}
      ...         for s in (0, 1) for st, a in ((100, .70), (200, .795), (300, .80), (400, .80))]
      >>> choose_length(rows)[0]
      200
    """
    configs = {(r["optimizer"], float(r["lr"])) for r in rows}
    steps = sorted({int(r["step"]) for r in rows})
    curve = {
        c: {
            s: 100 * np.mean([float(r["val_acc"]) for r in rows
                              if (r["optimizer"], float(r["lr"]), int(r["step"])) == (*c, s)])
            for s in steps
        }
        for c in configs
    }  # fmt: skip
    for c in curve.values():
        c["plateau"] = float(np.mean([c[s] for s in steps[-2:]]))
    sgd = [c for c in configs if c[0] == "sgd"]
    counted = [c for c in configs if c[0] == "adamw"]
    counted += [max(sgd, key=lambda c: curve[c]["plateau"])] if sgd else []
    ok = lambda s: all(curve[c][s] >= curve[c]["plateau"] - points for c in counted)
    return next((s for s in steps if ok(s)), steps[-1]), {c: curve[c] for c in counted}


def summary_lines(rows: Sequence[dict]) -> list[str]:
    """Mean ± sample sd (over seeds) of the validation accuracy, in %, at each length."""
    configs = list(dict.fromkeys((r["optimizer"], float(r["lr"])) for r in rows))
    steps = sorted({int(r["step"]) for r in rows})
    lines = [
        "| optimizer | lr | " + " | ".join(f"{s} steps" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for o, lr in configs:
        cells = []
        for s in steps:
            accs = [
                100 * float(r["val_acc"])
                for r in rows
                if (r["optimizer"], float(r["lr"]), int(r["step"])) == (o, lr, s)
            ]
            cells.append(f"{np.mean(accs):.1f} ± {sample_sd(accs):.1f} ({len(accs)})")
        lines.append(f"| {o} | {lr:g} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="rotten_tomatoes")
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--configs", nargs="+", default=["adamw=3.2e-3", "sgd=3.2e-2"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    ds = datasets.load(args.dataset).split_validation(args.n_val, seed=0)
    out = args.out or Path("results/training_length") / ds.name
    out.mkdir(parents=True, exist_ok=True)
    record_command(out, command_line("experiments.training_length", argv))
    task = ft.prepare(ds, max_length=args.max_length)
    path = out / "lengths.csv"
    done = set()
    if path.exists():
        with open(path, newline="") as f:
            done = {(r["optimizer"], float(r["lr"]), int(r["seed"])) for r in csv.DictReader(f)}
    for config in args.configs:
        name, _, lr = config.partition("=")
        kw = {"momentum": 0.9} if "sgd" in name else {"weight_decay": 0.0}
        for seed in args.seeds:
            if (name, float(lr), seed) in done:
                continue
            rows = run(task, name, float(lr), seed, args.steps, args.eval_every, kw)
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                w.writerows(rows)
            print(name, lr, seed, [f"{100 * r['val_acc']:.1f}" for r in rows], flush=True)
    with open(path, newline="") as f:
        lines = summary_lines(list(csv.DictReader(f)))
    header = [f"`{(out / 'command.txt').read_text().strip()}`", "", f"{ds.name}: validation "
              f"accuracy (%) on {args.n_val} documents, mean ± sample sd (seeds)", ""]  # fmt: skip
    with open(path, newline="") as f:
        length, counted = choose_length(list(csv.DictReader(f)))
    plateaus = ", ".join(f"{o} {lr:g}: {c['plateau']:.1f}" for (o, lr), c in counted.items())
    lines += ["", f"Length by the pre-registered rule: {length} steps (plateaus: {plateaus})."]
    (out / "summary.md").write_text("\n".join(header + lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
