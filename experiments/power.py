"""The power calculation of the pre-registered fine-tuning comparisons
(docs/experiments/preregistration.md), from the paired differences of the 3-seed sweeps in
``results/finetune/``::

    python -m experiments.power
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.stats import power_paired_t, power_tost, sample_sd

SEEDS = (8, 12, 16, 20)
TESTS = 8  # the primary family: Holm's smallest level is 0.05 / 8


def paired_sds(path: Path) -> dict[str, float]:
    """Sample sd (points) of scaled AdamW minus AdamW over seeds, at AdamW's best mean rate and
    one grid step above it."""
    acc = defaultdict(dict)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            acc[(r["optimizer"], float(r["lr"]))][int(r["seed"])] = 100 * float(r["eval_acc"])
    lrs = sorted({lr for o, lr in acc if o == "adamw"})
    best = max(lrs, key=lambda lr: np.mean(list(acc[("adamw", lr)].values())))
    out = {}
    for name, lr in (("best", best), ("one step above", lrs[lrs.index(best) + 1])):
        a, s = acc[("adamw", lr)], acc[("scaled_adamw", lr)]
        out[name] = sample_sd([s[k] - a[k] for k in sorted(a)])
    return out


def main() -> None:
    for dataset in ("rotten_tomatoes", "reuters_r8"):
        sds = paired_sds(Path("results/finetune") / dataset / "runs.csv")
        print(
            dataset,
            ", ".join(f"sd of the paired difference at {k}: {v:.2f}" for k, v in sds.items()),
        )
    alpha = 0.05 / TESTS
    print(f"\npower at the strictest Holm level, alpha = 0.05 / {TESTS}:")
    print("| seeds | H1: 2 points, sd 1.5 | H2: effect = sd | H3: margin 1, sd 0.75 | H3: sd 1.0 |")
    print("|---|---|---|---|---|")
    for n in SEEDS:
        cells = (
            power_paired_t(2.0, 1.5, n, alpha),
            power_paired_t(1.0, 1.0, n, alpha),
            power_tost(1.0, 0.75, n, alpha),
            power_tost(1.0, 1.0, n, alpha),
        )
        print(f"| {n} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
