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
            f"{r['first']:>22} vs {r['second']:<20} {r['metric']:<13} {r['diff']:+.4f} "
            f"[{r['lo']:+.4f}, {r['hi']:+.4f}] {r['verdict']}"
            + (f" (Holm p {r['p_holm']:.3g})" if "p_holm" in r else "")
        )


if __name__ == "__main__":
    main()
