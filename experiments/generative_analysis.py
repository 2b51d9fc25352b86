"""The analysis of the pre-registered generative design (docs/experiments/preregistration.md,
amendment 6): SmolLM2-135M rewriting KJV verses as the WEB (:mod:`experiments.generative_finetune`).

``design`` runs all of it: stage 1, the grid extensions its rule asks for, stage 2 and the
report (meant for a GPU: a run takes about 7 minutes on 2 CPU cores). ``rates``: each
optimizer's rate with the lowest mean loss on the valid verses over stage 1's seeds (a rate with
a diverged seed ranks last), whether it is at an edge of its grid, and the commands that follow.
``report``: family G's six tests on stage 2's test verses, paired by seed at the
rates stage 1 chose, Holm's correction over the six::

    python -m experiments.generative_analysis design --out results/prereg/generative
    python -m experiments.generative_analysis rates --stage1 results/prereg/generative/stage1
    python -m experiments.generative_analysis report \\
        --stage1 results/prereg/generative/stage1 --stage2 results/prereg/generative/stage2

A run whose test loss is not finite (it diverged) is scored as no learning: the untuned model's
test loss and BLEU, from the ``untuned`` row of the same folder.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.commands import command_line
from experiments.confirmatory import (
    ADAM_GRID,
    STAGE1_SEEDS,
    difference_test,
    half_decades_above,
    holm,
    stage2_lrs,
)
from experiments.finetune_classification import _read_runs
from experiments.generative_finetune import BASELINES, RUN_FIELDS, best_rates
from experiments.stats import t_interval

# Fixed by amendment 6: the grids, the seeds and the settings of every run (the Adam grid and
# stage 1's seeds are the classification design's).
SGD_GRID = (1e-2, 3.2e-2, 0.1, 0.32, 1.0, 3.2)
GRIDS = {"adamw": ADAM_GRID, "scaled_adamw": ADAM_GRID, "sgd": SGD_GRID, "scaled_sgd": SGD_GRID}
STAGE2_SEEDS = tuple(range(100, 108))
SETTINGS = ("--steps", "200", "--n-valid", "256", "--n-test", "256")
MAX_EXTENSIONS = 2  # grid steps added on one side of a pre-registered grid
# +1 where higher is better.
METRICS = {"test_loss": -1.0, "bleu": 1.0}
LABELS = ("G1", "G2a", "G2b")


def _read(folder: Path) -> list[dict]:
    return _read_runs(folder / "runs.csv", RUN_FIELDS, legacy=False)


def _trained(runs) -> list[dict]:
    return [r for r in runs if r["optimizer"] not in BASELINES]


def check_cells(runs, seeds: Sequence[int], stage: str) -> None:
    """The trained runs come from one setting, each cell (optimizer, rate) with ``seeds`` once
    each: a rate is never chosen, nor a test run, on part of its seeds."""
    runs = _trained(runs)
    settings = sorted({r["settings"] for r in runs})
    if len(settings) > 1:
        raise ValueError(f"{stage} mixes runs of {len(settings)} settings: {settings}.")
    cells: dict[tuple, list[int]] = {}
    for r in runs:
        cells.setdefault((r["optimizer"], r["lr"]), []).append(r["seed"])
    for (o, lr), got in cells.items():
        if sorted(got) != list(seeds):
            raise ValueError(
                f"{stage} has {o} at {lr:g} with seeds {sorted(got)}, not the pre-registered "
                f"{seeds[0]}-{seeds[-1]} once each (rerun its command to complete it)."
            )


def chosen_rates(runs) -> dict[str, dict]:
    """Per optimizer: ``{"lr", "edge", "grid"}``, the rate with the lowest mean valid loss."""
    check_cells(runs, STAGE1_SEEDS, "stage 1")
    runs = _trained(runs)
    out = {}
    for o, lr in best_rates(runs).items():
        grid = sorted({r["lr"] for r in runs if r["optimizer"] == o})
        out[o] = {"lr": lr, "edge": lr in (grid[0], grid[-1]), "grid": grid}
    return out


def check_stage2(runs, stage1) -> None:
    """Stage 2's trained runs: seeds 100 to 107 in every cell, and the settings of stage 1."""
    check_cells(runs, STAGE2_SEEDS, "stage 2")
    settings = {r["settings"] for r in _trained([*runs, *stage1])}
    if len(settings) > 1:
        raise ValueError(f"stage 1 and stage 2 were run with other settings: {sorted(settings)}.")


def scores(runs, optimizer: str, lr: float, metric: str) -> dict[int, float]:
    """Per seed, ``metric`` signed so that higher is better; a diverged run scores the untuned
    model's value."""
    untuned = [r for r in runs if r["optimizer"] == "untuned"]
    if not untuned:
        raise ValueError("stage 2 has no untuned row: run it without --skip-baselines.")
    out = {}
    for r in runs:
        if r["optimizer"] == optimizer and math.isclose(r["lr"], lr, rel_tol=1e-9):
            row = untuned[0] if not math.isfinite(r["test_loss"]) else r
            out[r["seed"]] = METRICS[metric] * row[metric]
    return out


def family_g(chosen: dict[str, dict], runs) -> list[dict]:
    """The six tests, each ``treatment - control`` (positive favours the treatment: a lower test
    loss, a higher BLEU), with the 95% t-interval, the p-value and Holm's over the six."""
    lr = {o: c["lr"] for o, c in chosen.items()}
    cells = [("G1", ("scaled_sgd", lr["scaled_sgd"]), ("sgd", lr["sgd"]))]
    for label, k in (("G2a", 1), ("G2b", 2)):
        rate = half_decades_above(lr["adamw"], k)
        cells.append((label, ("scaled_adamw", rate), ("adamw", rate)))
    out = []
    for metric in METRICS:
        for label, treat, control in cells:
            t, c = scores(runs, *treat, metric), scores(runs, *control, metric)
            d = np.array([t[s] - c[s] for s in sorted(set(t) & set(c))])
            if len(d) != len(STAGE2_SEEDS):
                raise ValueError(
                    f"{label}: {treat[0]} at {treat[1]:g} and {control[0]} at {control[1]:g} "
                    f"share {len(d)} seeds, not {len(STAGE2_SEEDS)}: is stage 2 the one that "
                    "stage 1's rates made?"
                )
            mean, lo, hi = t_interval(d)
            out.append(dict(test=label, metric=metric, treatment=f"{treat[0]}@{treat[1]:g}",
                            control=f"{control[0]}@{control[1]:g}", n=len(d), mean=mean,
                            lo=lo, hi=hi, p=difference_test(d)))  # fmt: skip
    for r, adjusted in zip(out, holm([r["p"] for r in out]), strict=True):
        r["p_holm"] = adjusted
        r["verdict"] = "supported" if adjusted < 0.05 and r["mean"] > 0 else "not supported"
    return out


def _argv(lrs: dict[str, Sequence[float]], seeds: Sequence[int], out: Path) -> list[str]:
    """``experiments.generative_finetune``'s arguments for ``lrs`` at ``seeds``."""
    spec = [f"{o}={','.join(f'{x:g}' for x in v)}" for o, v in lrs.items()]
    return ["--optimizers", *lrs, "--lrs", *spec, "--seeds", *map(str, seeds), *SETTINGS,
            "--out", str(out)]  # fmt: skip


def stage1_argv(stage1: Path, runs=()) -> list[str]:
    """Stage 1: the pre-registered grids and every rate an extension added to ``runs``, each
    on seeds 0 to 2 (a sweep resumes, so this completes a cell a stopped design left open)."""
    lrs = {o: sorted({*grid, *(r["lr"] for r in runs if r["optimizer"] == o)})
           for o, grid in GRIDS.items()}  # fmt: skip
    return _argv(lrs, STAGE1_SEEDS, stage1)


def extension_argv(stage1: Path, chosen: dict[str, dict]) -> list[str] | None:
    """The runs stage 1's rule adds: one grid step beyond each chosen rate at an edge of its
    grid, unless that side has been extended :data:`MAX_EXTENSIONS` times; ``None`` if none."""
    lrs = {}
    for o, c in chosen.items():
        grid, base = c["grid"], GRIDS.get(o, ())
        if not c["edge"] or not base:
            continue
        top = c["lr"] == grid[-1]
        beyond = [x for x in grid if (x > max(base) if top else x < min(base))]
        if len(beyond) < MAX_EXTENSIONS:
            lrs[o] = [half_decades_above(c["lr"], 1 if top else -1)]
    return _argv(lrs, STAGE1_SEEDS, stage1) if lrs else None


def stage2_argv(stage1: Path, chosen: dict[str, dict]) -> list[str]:
    return _argv(stage2_lrs(chosen), STAGE2_SEEDS, stage1.parent / "stage2")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("design", "rates", "report"))
    p.add_argument("--stage1", type=Path)
    p.add_argument("--stage2", type=Path)
    p.add_argument("--out", type=Path, help="design: the folder of both stages (and report.md)")
    args = p.parse_args(argv)
    if args.what == "design":
        if args.out is None:
            p.error("design needs --out")
        return design(args.out)
    if args.stage1 is None:
        p.error(f"{args.what} needs --stage1")
    chosen = chosen_rates(_read(args.stage1))
    if args.what == "rates":
        for o, c in chosen.items():
            print(f"{o}: {c['lr']:g}" + (" (at the grid's edge)" if c["edge"] else ""))
        extension = extension_argv(args.stage1, chosen)
        module = "experiments.generative_finetune"
        if extension is not None:
            print("stage 1 extension:", command_line(module, extension))
        print("stage 2:", command_line(module, stage2_argv(args.stage1, chosen)))
        return
    if args.stage2 is None:
        p.error("report needs --stage2")
    report(chosen, _read(args.stage2), args.stage2 / "report.md", _read(args.stage1))


def design(out: Path) -> None:
    """Stage 1, its grid extensions, stage 2 and the report, in ``out/stage1``, ``out/stage2``
    and ``out/stage2/report.md``; resumes like the sweeps it runs."""
    from experiments import generative_finetune

    stage1 = out / "stage1"
    while True:
        # Every rate stage 1 has started, on all its seeds (a resumed design may have stopped
        # inside an extension), before the rule looks at them.
        generative_finetune.main(stage1_argv(stage1, _read(stage1)))
        chosen = chosen_rates(_read(stage1))
        extension = extension_argv(stage1, chosen)
        if extension is None:
            break
        generative_finetune.main(extension)
    generative_finetune.main(stage2_argv(stage1, chosen))
    report(chosen, _read(out / "stage2"), out / "stage2" / "report.md", _read(stage1))


def report(chosen: dict[str, dict], runs, out: Path, stage1) -> None:
    """Writes family G's table to ``out`` (markdown) and prints it; ``stage1``'s runs give the
    settings stage 2 must share."""
    check_stage2(runs, stage1)
    lines = [
        "| test | treatment vs control | metric | seeds | mean diff | 95% CI | p (Holm) "
        "| verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in family_g(chosen, runs):
        lines.append(
            f"| {r['test']} | {r['treatment']} vs {r['control']} | {r['metric']} | {r['n']} | "
            f"{r['mean']:+.4g} | {r['lo']:+.4g} to {r['hi']:+.4g} | {r['p_holm']:.3g} | "
            f"{r['verdict']} |"
        )
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
