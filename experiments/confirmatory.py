"""The analysis of the pre-registered design (docs/experiments/preregistration.md).

``rates``: each optimizer's rate chosen on stage 1's validation accuracy, and the stage 2
commands that follow. ``report``: the hypotheses H1 to H4 tested on stage 2's test accuracies,
paired by seed at the rates stage 1 chose, with Holm's correction per family::

    python -m experiments.confirmatory rates --stage1 results/prereg/stage1/rotten_tomatoes
    python -m experiments.confirmatory report --dataset rotten_tomatoes \\
        --stage1 results/prereg/stage1/rotten_tomatoes \\
        --stage2 results/prereg/stage2/rotten_tomatoes

(``report`` takes ``--dataset``, ``--stage1`` and ``--stage2`` once per dataset, in order, for
both pre-registered datasets together: Holm's correction covers the 8 tests of each family.)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from experiments.finetune_classification import _read_runs
from experiments.stats import t_interval

ADAM = ("adamw", "scaled_adamw", "lora_rite", "reflora_adamw")
SGD = ("sgd", "scaled_sgd")
STAGE1_SEEDS = (0, 1, 2)
ADAM_GRID = (1e-4, 3.2e-4, 1e-3, 3.2e-3, 1e-2, 3.2e-2)
SGD_GRID = (1e-3, 3.2e-3, 1e-2, 3.2e-2, 0.1, 0.32, 1.0)
GRIDS = {o: ADAM_GRID for o in ADAM} | {o: SGD_GRID for o in SGD}
STAGE2_SEEDS = tuple(range(100, 120))
CONTINGENCY_SEEDS = tuple(range(100, 112))  # the pre-registered 12-seed contingency
DATASETS = ("rotten_tomatoes", "reuters_r8")
FAMILY_SIZES = {"primary": 8, "secondary": 8}  # 4 + 4 tests per dataset


def half_decades_above(lr: float, k: int) -> float:
    """The rate ``k`` half-decade grid steps above ``lr``, rounded like the grids (3.2e-3)."""
    x = 10 ** (math.log10(lr) + k / 2)
    return float(f"{x:.2g}")


def chosen_rates(stage1: Path) -> dict[str, dict]:
    """Per optimizer: the rate with the best mean validation accuracy (a rate with a diverged
    run ranks last), whether it is at an edge of the swept grid, and the grid."""
    rows = _read_runs(stage1 / "runs.csv")
    out = {}
    for o in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == o]
        if not any(np.isfinite(r["val_acc"]) for r in mine):
            cause = (
                "every run diverged"
                if all(r["diverged"] for r in mine)
                else "the sweep has no validation split (--n-val)"
            )
            raise ValueError(f"{stage1}: no validation accuracy for {o}: {cause}.")
        lrs = sorted({r["lr"] for r in mine})
        for lr in lrs:
            seeds = sorted(r["seed"] for r in mine if r["lr"] == lr)
            if seeds != list(STAGE1_SEEDS):
                raise ValueError(
                    f"{stage1}: {o} at {lr:g} has seeds {seeds}, not 0, 1 and 2 once each: "
                    "a rate is chosen on complete cells (rerun the sweep's command)."
                )
        mean = {
            lr: np.mean([r["val_acc"] for r in rows if r["optimizer"] == o and r["lr"] == lr])
            for lr in lrs
        }
        best = max(lrs, key=lambda lr: mean[lr] if np.isfinite(mean[lr]) else -np.inf)
        out[o] = {"lr": best, "edge": best in (lrs[0], lrs[-1]), "grid": lrs}
    return out


def check_stage1(rows, where) -> None:
    """Stage 1 is complete: every optimizer over at least its whole pre-registered grid (an
    extension adds rates), from one setting; :func:`chosen_rates` checks each cell's seeds."""
    settings = sorted({r["settings"] for r in rows})
    if len(settings) != 1:
        raise ValueError(f"{where}: stage 1 mixes runs of {len(settings)} settings: {settings}.")
    for o, grid in GRIDS.items():
        have = {r["lr"] for r in rows if r["optimizer"] == o}
        missing = [lr for lr in grid if not any(math.isclose(lr, x, rel_tol=1e-9) for x in have)]
        if missing:
            raise ValueError(
                f"{where}: stage 1 has no {o} at {', '.join(f'{x:g}' for x in missing)}: "
                "rates are chosen on the whole grid (rerun the sweep's command)."
            )


def check_design(dataset: str, chosen: dict, stage1, stage2) -> None:
    """Stage 2 is the one stage 1's rates make: the same dataset and settings, and exactly the
    cells of :func:`stage2_lrs` (a missing cell would make a test of no seeds)."""
    for stage, rows in (("stage 1", stage1), ("stage 2", stage2)):
        names = {r["dataset"] for r in rows}
        if names != {dataset}:
            raise ValueError(f"{stage} of {dataset} holds runs of {sorted(names)}.")
    if {r["settings"] for r in stage2} != {r["settings"] for r in stage1}:
        raise ValueError(f"{dataset}: stage 2 was run with other settings than stage 1.")
    want = {(o, lr) for o, lrs in stage2_lrs(chosen).items() for lr in lrs}
    have = {(r["optimizer"], r["lr"]) for r in stage2}
    if have != want:
        fmt = lambda cells: ", ".join(f"{o} at {lr:g}" for o, lr in sorted(cells)) or "none"
        raise ValueError(
            f"{dataset}: stage 2 lacks {fmt(want - have)} and has {fmt(have - want)} beyond "
            "the cells that stage 1's rates make."
        )


def stage2_lrs(chosen: dict[str, dict]) -> dict[str, list[float]]:
    """Stage 2's rates: each optimizer's chosen one, and for AdamW and scaled AdamW also one and
    two half-decades above AdamW's."""
    lrs = {o: [c["lr"]] for o, c in chosen.items()}
    if "adamw" in chosen:
        above = [half_decades_above(chosen["adamw"]["lr"], k) for k in (1, 2)]
        for o in ("adamw", "scaled_adamw"):
            if o in lrs:
                lrs[o] = sorted(set(lrs[o]) | set(above))
    return lrs


def validation_rows(dataset: str, rows, chosen: dict) -> list[str]:
    """Markdown rows, one per optimizer: stage 1's mean ± sample sd validation accuracy (%) at
    each rate of the grids, the chosen one in bold, "div" for a rate with a diverged seed. It
    describes how the choice was made; nothing is tested on it."""
    rates = sorted({r["lr"] for r in rows})
    lines = [
        f"| {dataset} | " + " | ".join(f"{x:g}" for x in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for o, c in chosen.items():
        cells = []
        for lr in rates:
            mine = [r for r in rows if r["optimizer"] == o and r["lr"] == lr]
            acc = np.array([100 * r["val_acc"] for r in mine])
            if not mine:
                cells.append("")
            elif any(r["diverged"] for r in mine) or not np.all(np.isfinite(acc)):
                cells.append("div")
            else:
                cell = f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}"
                cells.append(f"**{cell}**" if lr == c["lr"] else cell)
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    return lines


def check_stage2(rows) -> None:
    """Stage 2's runs must come from one setting, once per seed, with the pre-registered
    seeds (or the 12-seed contingency) in every cell."""
    settings = sorted({r["settings"] for r in rows})
    if len(settings) != 1:
        raise ValueError(f"stage 2 mixes runs of {len(settings)} settings: {settings}.")
    cells: dict[tuple, list[int]] = {}
    for r in rows:
        cells.setdefault((r["optimizer"], r["lr"]), []).append(r["seed"])
    for (o, lr), seeds in cells.items():
        if len(seeds) != len(set(seeds)):
            raise ValueError(f"stage 2 has {o} at {lr:g} twice for a seed: {sorted(seeds)}.")
        if tuple(sorted(seeds)) not in (STAGE2_SEEDS, CONTINGENCY_SEEDS):
            raise ValueError(
                f"stage 2 has {o} at {lr:g} with seeds {sorted(seeds)}, not the pre-registered "
                f"{STAGE2_SEEDS[0]}-{STAGE2_SEEDS[-1]} (or {CONTINGENCY_SEEDS[-1]})."
            )
    if len({tuple(sorted(seeds)) for seeds in cells.values()}) > 1:
        raise ValueError("stage 2 mixes cells of 20 and of 12 seeds: one count for the design.")


def accuracies(rows, optimizer: str, lr: float, chance: float) -> dict[int, float]:
    """Test accuracy (points) per seed; a diverged run scores the majority class's ``chance``."""
    return {
        r["seed"]: 100
        * (chance if r["diverged"] or not np.isfinite(r["eval_acc"]) else r["eval_acc"])
        for r in rows
        if r["optimizer"] == optimizer and math.isclose(r["lr"], lr, rel_tol=1e-9)
    }


def paired(treat: dict[int, float], control: dict[int, float]) -> np.ndarray:
    seeds = sorted(set(treat) & set(control))
    return np.array([treat[s] - control[s] for s in seeds])


def difference_test(d: np.ndarray) -> float:
    """Two-sided p-value of the paired t-test that the mean difference is 0."""
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def equivalence_test(d: np.ndarray, margin: float) -> float:
    """p-value of the paired TOST with margin ``± margin``: the larger one-sided p-value."""
    lower = stats.ttest_1samp(d, -margin, alternative="greater").pvalue
    upper = stats.ttest_1samp(d, margin, alternative="less").pvalue
    return float(max(lower, upper))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order.

    Example:
      >>> holm([0.01, 0.04, 0.03])
      [0.03, 0.06, 0.06]
    """
    order = np.argsort(pvalues)
    m, adjusted, running = len(pvalues), [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = round(running, 12)
    return adjusted


def tests_for(dataset: str, chosen: dict, rows, chance: float) -> list[dict]:
    """The dataset's tests of H1-H4 (unadjusted): name, family, the differences and p."""
    lr = {o: c["lr"] for o, c in chosen.items()}
    acc = lambda o, rate: accuracies(rows, o, rate, chance)
    out = []

    def add(name, family, d, p, kind):
        mean, lo, hi = t_interval(d)
        out.append(dict(dataset=dataset, hypothesis=name, family=family, kind=kind, n=len(d),
                        mean=mean, lo=lo, hi=hi, p=p))  # fmt: skip

    d = paired(acc("scaled_sgd", lr["scaled_sgd"]), acc("sgd", lr["sgd"]))
    add("H1 scaled_sgd > sgd", "primary", d, difference_test(d), "greater")
    for k in (1, 2):
        rate = half_decades_above(lr["adamw"], k)
        d = paired(acc("scaled_adamw", rate), acc("adamw", rate))
        add(
            f"H2 scaled_adamw > adamw at +{k} ({rate:g})",
            "primary",
            d,
            difference_test(d),
            "greater",
        )
    d = paired(acc("scaled_adamw", lr["scaled_adamw"]), acc("adamw", lr["adamw"]))
    add("H3 |scaled_adamw - adamw| < 1", "primary", d, equivalence_test(d, 1.0), "equivalent")
    for t in ("lora_rite", "reflora_adamw"):
        for c in ("scaled_adamw", "adamw"):
            d = paired(acc(t, lr[t]), acc(c, lr[c]))
            add(f"H4 {t} vs {c}", "secondary", d, difference_test(d), "two-sided")
    return out


def cell_rows(dataset: str, chosen: dict, rows, chance: float) -> list[str]:
    """Markdown rows, one per stage 2 cell: the optimizer, its rate and why it ran (chosen, or
    one or two steps above AdamW's rate), the seeds, the test accuracy's mean ± sample sd
    (diverged runs scored as the majority class) and how many runs diverged."""
    lines = []
    above = {half_decades_above(chosen["adamw"]["lr"], k): f"+{k}" for k in (1, 2)}
    for o, c in chosen.items():
        rates = sorted({r["lr"] for r in rows if r["optimizer"] == o})
        for lr in rates:
            role = "chosen" if math.isclose(lr, c["lr"], rel_tol=1e-9) else None
            step = next((k for x, k in above.items() if math.isclose(lr, x, rel_tol=1e-9)), None)
            if o in ("adamw", "scaled_adamw") and step is not None:
                role = f"{role}, {step}" if role else step
            if role is None:
                raise ValueError(f"stage 2 has {o} at {lr:g}, a rate the design does not run.")
            acc = np.array(list(accuracies(rows, o, lr, chance).values()))
            diverged = sum(
                r["diverged"] for r in rows if r["optimizer"] == o and math.isclose(r["lr"], lr)
            )
            lines.append(
                f"| {dataset} | {o} | {lr:g} | {role} | {len(acc)} | "
                f"{acc.mean():.2f} ± {acc.std(ddof=1):.2f} | {diverged} |"
            )
    return lines


def decide(results: list[dict], sizes: dict[str, int] = FAMILY_SIZES) -> list[dict]:
    """Holm per family, then the pre-registered verdicts; each family must have the
    pre-registered number of tests (``sizes``), or the correction would be another."""
    for family in ("primary", "secondary"):
        members = [r for r in results if r["family"] == family]
        if len(members) != sizes[family]:
            raise ValueError(
                f"the {family} family has {len(members)} tests, not the pre-registered "
                f"{sizes[family]}: report both datasets together."
            )
        for r, p in zip(members, holm([r["p"] for r in members]), strict=True):
            r["p_holm"] = p
            significant = p < 0.05
            if r["kind"] == "greater":
                r["verdict"] = "supported" if significant and r["mean"] > 0 else "not supported"
            elif r["kind"] == "equivalent":
                r["verdict"] = "supported" if significant else "not supported"
            elif not significant:
                r["verdict"] = "no difference detected"
            else:
                r["verdict"] = "better" if r["mean"] > 0 else "worse"
    return results


def analyse(designs: Sequence[tuple[str, Path, Path]]) -> tuple[list[str], list[dict]]:
    """The report's cell rows (with their header) and the tests of H1-H4, Holm-corrected per
    family and decided (``decide``'s rows). ``designs``: (dataset, stage 1 folder, stage 2
    folder) for each pre-registered dataset, checked complete and consistent first."""
    from experiments.data import datasets

    results, seed_sets = [], set()
    cells = [
        "| dataset | optimizer | rate | ran as | seeds | test accuracy (%) | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, stage1, stage2 in designs:
        labels = datasets.load(name).test_labels
        chance = float(np.bincount(labels).max() / len(labels))
        first, runs = _read_runs(stage1 / "runs.csv"), _read_runs(stage2 / "runs.csv")
        check_stage1(first, stage1)
        check_stage2(runs)
        chosen = chosen_rates(stage1)
        check_design(name, chosen, first, runs)
        seed_sets.add(tuple(sorted({r["seed"] for r in runs})))
        results += tests_for(name, chosen, runs, chance)
        cells += cell_rows(name, chosen, runs, chance)
    if len(seed_sets) > 1:
        raise ValueError("the datasets' stage 2 ran different seeds: one count for the design.")
    return cells, decide(results)


def report_lines(cells: list[str], decided: list[dict]) -> list[str]:
    """The report's Markdown: ``analyse``'s cell rows, then a row per decided test."""
    lines = [
        *cells,
        "",
        "| dataset | hypothesis | seeds | mean diff | 95% CI | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in decided:
        lines.append(
            f"| {r['dataset']} | {r['hypothesis']} | {r['n']} | {r['mean']:.2f} | "
            f"{r['lo']:.2f} to {r['hi']:.2f} | {r['p_holm']:.3g} | {r['verdict']} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("rates", "report"))
    p.add_argument("--dataset", action="append", default=[])
    p.add_argument("--stage1", type=Path, action="append", default=[])
    p.add_argument("--stage2", type=Path, action="append", default=[])
    p.add_argument("--out", type=Path, default=Path("results/prereg/report.md"))
    p.add_argument(
        "--contingency", action="store_true", help="rates: print the 12-seed stage 2 command"
    )
    args = p.parse_args(argv)
    if args.what == "rates":
        for stage1 in args.stage1:
            rows = _read_runs(stage1 / "runs.csv")
            check_stage1(rows, stage1)
            chosen = chosen_rates(stage1)
            run = rows[0]
            n_val = dict(kv.split("=", 1) for kv in run["settings"].split(";")).get("n_val")
            print("\n".join(validation_rows(run["dataset"], rows, chosen)))
            for o, c in chosen.items():
                print(
                    f"{stage1.name} {o}: {c['lr']:g}"
                    + (" (at the grid's edge)" if c["edge"] else "")
                )
            lrs = " ".join(
                f"{o}={','.join(f'{x:g}' for x in v)}" for o, v in stage2_lrs(chosen).items()
            )
            seeds = " ".join(map(str, CONTINGENCY_SEEDS if args.contingency else STAGE2_SEEDS))
            print(
                f"stage 2: python -m experiments.finetune_classification --dataset "
                f"{run['dataset']} --n-val {n_val} --steps {run['steps']} --optimizers "
                f"{' '.join(chosen)} --lrs {lrs} --seeds {seeds} --out "
                f"results/prereg/stage2/{run['dataset']}"
            )
        return
    if sorted(args.dataset) != sorted(DATASETS):
        p.error(f"report takes the pre-registered datasets together: {' '.join(DATASETS)}")
    designs = list(zip(args.dataset, args.stage1, args.stage2, strict=True))
    lines = report_lines(*analyse(designs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
