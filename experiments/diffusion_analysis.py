"""The analysis of a custom-concept sweep (:mod:`experiments.diffusion_concept`): rates chosen
on the validation half, paired comparisons over seeds on the test half.

Run ``python -m experiments.diffusion_analysis results/diffusion/concept``: it prints the
tables of ``docs/experiments/diffusion.md`` and writes them to ``summary.csv`` beside
``runs.csv``.

Each optimizer's rate is the one with the lowest mean validation loss over the seeds (a
diverged run counts as infinitely bad). A comparison pairs seed ``s`` of one optimizer at its
rate with seed ``s`` of the other at its own and reports the mean difference with its 95%
t-interval, signed so that a positive difference favours the first optimizer (lower loss, higher
fidelity or prior). "Above" rows compare scaled AdamW with AdamW at one and two grid steps above
AdamW's chosen rate, as in the paper's learning-rate robustness claim.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.confirmatory import difference_test, holm
from experiments.finetune_classification import _read_runs
from experiments.stats import t_interval, verdict

# Sign: +1 where higher is better.
METRICS = {"test_loss": -1.0, "early_test_loss": -1.0, "test_fidelity": 1.0, "prior": 1.0}
PAIRS = (
    ("scaled_sgd", "sgd"),
    ("scaled_adamw", "adamw"),
    ("lora_rite", "adamw"),
    ("reflora_adamw", "adamw"),
    ("lora_rite", "scaled_adamw"),
    ("reflora_adamw", "scaled_adamw"),
)


def _by_cell(rows):
    cells = defaultdict(dict)
    for r in rows:
        cells[(r["optimizer"], float(r["lr"]))][int(r["seed"])] = r
    return cells


def _val(r) -> float:
    return math.inf if r["diverged"] or not math.isfinite(r["val_loss"]) else r["val_loss"]


def chosen_rates(rows) -> dict[str, float]:
    """Each optimizer's rate with the lowest mean validation loss over its seeds."""
    means = defaultdict(dict)
    for (o, lr), seeds in _by_cell(rows).items():
        means[o][lr] = float(np.mean([_val(r) for r in seeds.values()]))
    return {o: min(lrs, key=lrs.get) for o, lrs in means.items()}


def _score(r, metric: str) -> float:
    return METRICS[metric] * r[metric]  # diffusion_concept scores a diverged run as no learning


def compare(rows, first: tuple[str, float], second: tuple[str, float], metric: str) -> dict:
    """Paired over the seeds both cells have: ``first - second``, positive favours ``first``."""
    cells = _by_cell(rows)
    a, b = cells.get(first, {}), cells.get(second, {})
    seeds = sorted(set(a) & set(b))
    diffs = np.array([_score(a[s], metric) - _score(b[s], metric) for s in seeds])
    (mean, lo, hi), p = t_interval(diffs), difference_test(diffs)
    return {
        "first": f"{first[0]}@{first[1]:g}",
        "second": f"{second[0]}@{second[1]:g}",
        "metric": metric,
        "seeds": len(seeds),
        "diff": mean,
        "lo": lo,
        "hi": hi,
        "p": p,
        "verdict": verdict(lo, hi, first[0], second[0]),
    }


def _step_above(rows, optimizer: str, lr: float, k: int) -> float | None:
    grid = sorted({float(r["lr"]) for r in rows if r["optimizer"] == optimizer} | {lr})
    i = grid.index(lr) + k
    return grid[i] if i < len(grid) else None


# The pre-registered families (docs/experiments/preregistration.md, amendment 4): the metric
# and the comparisons of each.
CLAIMS = ("scaled_sgd vs sgd", "scaled_adamw vs adamw", "above 1", "above 2")
FAMILIES = {
    "D": ("test_loss", CLAIMS),
    "S": ("early_test_loss", CLAIMS),
    "E": ("test_loss", tuple(f"{t} vs {c}" for t, c in PAIRS[2:])),
}


def summary(rows, chosen: dict[str, float] | None = None) -> list[dict]:
    """Every comparison of the page: the pairs at their chosen rates (``chosen``, by default
    :func:`chosen_rates` of ``rows``), then "above" rows; the test-loss rows of each family get
    Holm-adjusted p-values (``p_holm``)."""
    chosen = chosen_rates(rows) if chosen is None else chosen
    out = []
    for t, c in PAIRS:
        if t in chosen and c in chosen:
            name = f"{t} vs {c}"
            out += [
                compare(rows, (t, chosen[t]), (c, chosen[c]), m) | {"test": name} for m in METRICS
            ]
    if {"adamw", "scaled_adamw"} <= set(chosen):
        for k in (1, 2):
            lr = _step_above(rows, "adamw", chosen["adamw"], k)
            if lr is not None:
                pair = (("scaled_adamw", lr), ("adamw", lr))
                out += [
                    compare(rows, *pair, m) | {"above": k, "test": f"above {k}"} for m in METRICS
                ]
    for family, (metric, names) in FAMILIES.items():
        primary = [r for r in out if r["metric"] == metric and r["test"] in names]
        for r, adjusted in zip(primary, holm([r["p"] for r in primary]), strict=True):
            r |= {"family": family, "p_holm": adjusted}
    return out


LABELS = {
    "D": ("D1", "D2", "D3a", "D3b"),
    "S": ("S1", "S2", "S3a", "S3b"),
    "E": ("E1", "E2", "E3", "E4"),
}


def _outcome(r) -> str:
    significant = r["p_holm"] < 0.05
    if r["family"] != "E":
        return "supported" if significant and r["diff"] > 0 else "not supported"
    if not significant:
        return "no difference detected"
    return f"{r['first'].split('@')[0]} {'better' if r['diff'] > 0 else 'worse'}"


def hypothesis_rows(table) -> list[str]:
    """The page's markdown rows, one per tested comparison, in the pre-registration's order."""
    lines = []
    for family, (_, names) in FAMILIES.items():
        for label, name in zip(LABELS[family], names, strict=True):
            for r in table:
                if r.get("family") == family and r["test"] == name:
                    lines.append(
                        f"| {label} | {r['first']} vs {r['second']} | {r['metric']} | "
                        f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] | "
                        f"{r['p_holm']:.3g} | {_outcome(r)} |"
                    )
    return lines


def optimizer_rows(rows, chosen: dict[str, float]) -> list[str]:
    """The page's markdown rows: each optimizer at its chosen rate, means ± sample sd."""
    cells, lines = _by_cell(rows), []
    for o, lr in chosen.items():
        runs = list(cells.get((o, lr), {}).values())
        if not runs:
            continue
        stats = []
        for m in ("test_loss", "early_test_loss", "test_fidelity", "prior"):
            x = np.array([r[m] for r in runs], float)
            stats.append(
                f"{x.mean():.4f} ± {x.std(ddof=1):.4f}"
                if "loss" in m
                else f"{x.mean():.2f} ± {x.std(ddof=1):.2f}"
            )
        diverged = sum(bool(r["diverged"]) for r in runs)
        lines.append(f"| {o} | {lr:g} | {len(runs)} | {' | '.join(stats)} | {diverged} |")
    return lines


def stage2_lrs(rows, chosen: dict[str, float]) -> dict[str, list[float]]:
    """Stage 2's rates: each optimizer's chosen rate; AdamW and scaled AdamW also at one and
    two steps above AdamW's (on the stage 1 grid ``rows`` ran)."""
    lrs = {o: [lr] for o, lr in chosen.items()}
    for k in (1, 2):
        above = _step_above(rows, "adamw", chosen["adamw"], k) if "adamw" in chosen else None
        for o in ("adamw", "scaled_adamw"):
            if above is not None and o in lrs and above not in lrs[o]:
                lrs[o].append(above)
    return {o: sorted(v) for o, v in lrs.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--rates-from", type=Path, help="the stage 1 sweep that chose the rates")
    args = parser.parse_args(argv)
    from experiments.diffusion_concept import RUN_FIELDS

    rows = _read_runs(args.sweep / "runs.csv", RUN_FIELDS, legacy=False)
    stage1 = args.rates_from or args.sweep
    chosen = chosen_rates(_read_runs(stage1 / "runs.csv", RUN_FIELDS, legacy=False))
    for o, lr in sorted(chosen.items()):
        print(f"{o}: rate {lr:g} (chosen in {stage1})")
    lrs = stage2_lrs(_read_runs(stage1 / "runs.csv", RUN_FIELDS, legacy=False), chosen)
    spec = " ".join(f"{o}={','.join(f'{x:g}' for x in v)}" for o, v in lrs.items())
    print(
        f"stage 2: python -m experiments.diffusion_concept --optimizers {' '.join(lrs)} "
        f"--lrs {spec} --seeds {' '.join(map(str, range(100, 112)))} --out <stage 2 folder>"
    )
    table = summary(rows, chosen)
    fields = ["test", "first", "second", "metric", "seeds", "diff", "lo", "hi", "verdict", "p",
              "family", "p_holm", "above"]  # fmt: skip
    with open(args.sweep / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(table)
    for r in table:
        print(
            f"{r['first']:>22} vs {r['second']:<20} {r['metric']:<15} {r['diff']:+.4f} "
            f"[{r['lo']:+.4f}, {r['hi']:+.4f}] {r['verdict']}"
        )
    print("\n".join(["", *optimizer_rows(rows, chosen), "", *hypothesis_rows(table)]))


if __name__ == "__main__":
    main()
