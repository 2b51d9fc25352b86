"""Custom-concept LoRA on the digit diffusion model: the paper's text-to-image claim, small.

As in DreamBooth / Mix-of-Show, a concept the base model never saw (a held-out digit, default
7) is taught from a few images (``--shots``, default 8, the first of its training images) as a
new prompt token ``<v1>``: LoRA (``rplora_jax.inject_linen``, rank 4) on every attention
projection and MLP layer of the denoiser, and the new token's embedding, trained on the
denoising loss of those images alone. Each optimizer of :mod:`experiments.optimizers` runs over
a learning-rate grid and seeds (the seed draws the LoRA initialisation, the times and the noise;
the images are the same). Per run, ``runs.csv`` gets:

* ``val_loss`` / ``test_loss``: the concept's denoising loss (fixed times and noise) on half of
  its 50 test images each: the validation half chooses rates, the test half reports;
  ``early_test_loss`` is the test half's after 50 steps (how fast the concept is learned);
* ``val_fidelity`` / ``test_fidelity``: the fraction of 32 guided samples of ``<v1>`` the
  classifier reads as the concept (two different noise seeds);
* ``prior``: the fraction of 8 samples per seen digit's prompt read as that digit (prior
  preservation; the base model's figure is in ``results/diffusion/base/quality.csv``);

and ``curves.csv`` the validation loss over steps (convergence); ``loss_vs_lr.png`` and
``curves.png`` plot them. A run whose loss is not finite
at the end is ``diverged`` and scored as no learning: the untrained model's losses, fidelity
and prior 0. ``samples/`` keeps seed 0's
first four samples per optimizer and rate, for :func:`grid_png`.

Run ``python -m experiments.diffusion_concept`` after :mod:`experiments.diffusion_pretrain`;
runs already in ``--out``/``runs.csv`` are skipped, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rplora_jax
from experiments.commands import command_line, record_command
from experiments.data.images import mnist_5k
from experiments.diffusion_pretrain import classify, load_denoiser, load_params
from experiments.finetune_classification import run_sweep, settings_string
from experiments.models import denoiser as dn
from experiments.optimizers import ALL_OPTIMIZERS, make_optimizer, make_train_step

CONCEPT_TOKEN = dn.token("<v1>")
RUN_FIELDS = (
    "dataset", "optimizer", "lr", "seed", "steps", "settings", "val_loss", "test_loss",
    "early_test_loss", "val_fidelity", "test_fidelity", "prior", "train_loss", "seconds",
    "diverged",
)  # fmt: skip
CURVE_FIELDS = ("optimizer", "lr", "seed", "settings", "step", "val_loss")
ALSO_TRAIN = r"params/new_token_embedding"  # the new token's embedding trains beside the LoRA
DEFAULT_LRS = {
    "sgd": (1e-2, 3.2e-2, 0.1, 0.32, 1.0, 3.2),
    "scaled_sgd": (1e-3, 3.2e-3, 1e-2, 3.2e-2, 0.1, 0.32),
    "default": (1e-4, 3.2e-4, 1e-3, 3.2e-3, 1e-2, 3.2e-2),
}


class Concept:
    """The base model with LoRA, the concept's shots and its validation / test images."""

    def __init__(self, base: Path, concept: int, shots: int, rank: int):
        digits = mnist_5k()
        self.concept, self.seen = concept, [d for d in range(10) if d != concept]
        denoiser, self.base = load_denoiser(base)
        self.classifier = load_params(base / "classifier.safetensors")
        lora = rplora_jax.LoRAConfig(rank=rank, alpha=float(rank))
        self.model = rplora_jax.inject_linen(denoiser, dn.LORA_TARGETS, lora)
        self.shots = jnp.asarray(digits.of([concept])[:shots])
        tests = jnp.asarray(digits.of([concept], "test"))
        self.val, self.test = tests[: len(tests) // 2], tests[len(tests) // 2 :]

    def init(self, seed: int):
        x, t, p = jnp.zeros((1, 28, 28)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
        variables = self.model.init_from(self.base, jax.random.key(seed), x, t, p)
        return jax.tree.map(jnp.copy, variables)  # the train step donates them: not self.base

    def loss(self, variables, batch):
        prompt = jnp.full((batch["x"].shape[0],), CONCEPT_TOKEN, jnp.int32)
        return dn.denoising_loss(self.model, variables, batch["x"], prompt, batch["key"])

    def concept_loss(self, variables, images) -> float:
        prompt = jnp.full((images.shape[0],), CONCEPT_TOKEN, jnp.int32)
        return dn.fixed_denoising_loss(self.model, variables, images, prompt)

    def samples(self, variables, token: int, n: int, seed: int):
        prompt = jnp.full((n,), token, jnp.int32)
        return dn.sample(self.model, variables, prompt, jax.random.key(seed))

    def fidelity(self, variables, seed: int) -> tuple[float, np.ndarray]:
        drawn = self.samples(variables, CONCEPT_TOKEN, 32, seed)
        return float(np.mean(classify(self.classifier, drawn) == self.concept)), np.asarray(drawn)

    def prior(self, variables) -> float:
        tokens = np.repeat([dn.digit_token(d) for d in self.seen], 8)
        drawn = dn.sample(self.model, variables, jnp.asarray(tokens, jnp.int32), jax.random.key(7))
        return float(np.mean(classify(self.classifier, drawn) == tokens - 1))


def train_run(
    task: Concept,
    step_fn,
    optimizer: str,
    lr: float,
    seed: int,
    *,
    steps: int,
    batch: int,
    evals: int = 8,
    early: int = 50,
) -> dict:
    """One run: ``steps`` steps of ``batch`` shots (with replacement), evaluated ``evals`` times
    on the validation half, and on the test half after ``early`` steps (how fast it learns)."""
    tx = make_optimizer(optimizer, lr, also_train=ALSO_TRAIN)
    variables = task.init(seed)
    state = tx.init(variables)
    rng, key = np.random.default_rng(seed), jax.random.key(seed)
    curve, losses, start = [], [], time.time()
    early, early_test = min(early, steps), math.nan
    at = set(np.unique(np.geomspace(1, steps, evals).round().astype(int)))
    curve.append({"step": 0, "val_loss": f"{task.concept_loss(variables, task.val):.5f}"})
    for i in range(1, steps + 1):
        key, sub = jax.random.split(key)
        x = task.shots[rng.integers(0, task.shots.shape[0], batch)]
        variables, state, loss = step_fn[optimizer](variables, state, {"x": x, "key": sub})
        losses.append(float(loss))
        if i == early:
            early_test = task.concept_loss(variables, task.test)
        if i in at:
            curve.append({"step": i, "val_loss": f"{task.concept_loss(variables, task.val):.5f}"})
    diverged = not all(math.isfinite(v) for v in losses[-10:])
    if diverged:  # scored as no learning: the untrained model's losses, no concept, no prior
        return _diverged(task, seed, curve, losses, time.time() - start)
    if not math.isfinite(early_test):  # recovered after step `early`: still no learning then
        early_test = task.concept_loss(task.init(seed), task.test)
    val_fid, drawn = task.fidelity(variables, seed=100)
    test_fid, _ = task.fidelity(variables, seed=200)
    return {
        "val_loss": task.concept_loss(variables, task.val),
        "test_loss": task.concept_loss(variables, task.test),
        "early_test_loss": early_test,
        "val_fidelity": val_fid,
        "test_fidelity": test_fid,
        "prior": task.prior(variables),
        "train_loss": float(np.mean(losses[-20:])),
        "seconds": time.time() - start,
        "diverged": False,
        "curve": curve,
        "drawn": drawn[:4],
    }


def _diverged(task: Concept, seed: int, curve, losses, seconds) -> dict:
    untrained = task.init(seed)
    test_loss = task.concept_loss(untrained, task.test)
    return {
        "val_loss": task.concept_loss(untrained, task.val),
        "test_loss": test_loss,
        "early_test_loss": test_loss,
        "val_fidelity": 0.0,
        "test_fidelity": 0.0,
        "prior": 0.0,
        "train_loss": float(np.mean(losses[-20:])),
        "seconds": seconds,
        "diverged": True,
        "curve": curve,
        "drawn": np.zeros((4, 28, 28), np.float32),
    }


def grid_png(out: Path, optimizers, lrs_of) -> Path:
    """``samples.png``: a row per optimizer, a column per rate of its grid; each cell holds seed
    0's first four samples of ``<v1>`` (2 x 2), titled with the rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(lrs_of(o)) for o in optimizers)
    fig, axes = plt.subplots(len(optimizers), cols, figsize=(cols * 1.2, len(optimizers) * 1.35),
                             squeeze=False)  # fmt: skip
    for r, o in enumerate(optimizers):
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            lrs = lrs_of(o)
            path = out / "samples" / f"{o}_{lrs[c]:g}.npy" if c < len(lrs) else None
            if path is None or not path.exists():
                ax.axis("off")
                continue
            four = np.load(path)
            ax.imshow(
                np.block([[four[0], four[1]], [four[2], four[3]]]), cmap="gray", vmin=0, vmax=1
            )
            ax.set_title(f"{lrs[c]:g}", fontsize=7)
        axes[r, 0].set_ylabel(o, fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    return out / "samples.png"


def plots(out: Path, rows, curves_path: Path) -> list[Path]:
    """``loss_vs_lr.png`` (mean validation and test loss ± sd over seeds against the rate) and
    ``curves.png`` (mean validation loss over steps, each optimizer at its best rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from experiments.diffusion_analysis import chosen_rates

    by = defaultdict(list)
    for r in rows:
        by[(r["optimizer"], float(r["lr"]))].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, metric in zip(axes, ("val_loss", "test_loss"), strict=True):
        for o in dict.fromkeys(r["optimizer"] for r in rows):
            lrs = sorted(lr for oo, lr in by if oo == o)
            x = [np.array([float(r[metric]) for r in by[(o, lr)]]) for lr in lrs]
            sd = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in x]
            ax.errorbar(lrs, [v.mean() for v in x], yerr=sd, marker="o", ms=3, label=o, capsize=2)
        ax.set(xscale="log", yscale="log", xlabel="learning rate", title=metric.replace("_", " "))
    axes[0].set_ylabel("concept denoising loss")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_lr.png", dpi=100)
    plt.close(fig)

    best, steps = chosen_rates(rows), defaultdict(list)
    with open(curves_path, newline="") as f:
        for r in csv.DictReader(f):
            if best.get(r["optimizer"]) == float(r["lr"]):
                steps[(r["optimizer"], int(r["step"]))].append(float(r["val_loss"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for o, lr in best.items():
        points = sorted((st, np.mean(v)) for (oo, st), v in steps.items() if oo == o and st > 0)
        ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=f"{o} {lr:g}")
    ax.set(xscale="log", yscale="log", xlabel="step", ylabel="validation loss (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    return [out / "loss_vs_lr.png", out / "curves.png"]


def _lrs(spec: list[str] | None):
    table = dict(DEFAULT_LRS)
    for item in spec or ():
        name, values = item.split("=")
        table[name] = tuple(float(v) for v in values.split(","))
    return lambda o: table.get(o, table["default"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("results/diffusion/base"))
    parser.add_argument("--concept", type=int, default=7)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=["sgd", "scaled_sgd", "adamw", "scaled_adamw", "lora_rite", "reflora_adamw"],
        choices=ALL_OPTIMIZERS,
    )
    parser.add_argument("--lrs", nargs="*", help="NAME=lr,lr,... (default: DEFAULT_LRS)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("results/diffusion/concept"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "samples").mkdir(exist_ok=True)
    record_command(args.out, command_line("experiments.diffusion_concept", argv))
    task, lrs_of = Concept(args.base, args.concept, args.shots, args.rank), _lrs(args.lrs)
    # One compiled step per optimizer: the rate lives in the optimizer state.
    steps = {
        o: make_train_step(task.loss, make_optimizer(o, 1e-3, also_train=ALSO_TRAIN))
        for o in args.optimizers
    }
    jobs = [(o, lr, s) for o in args.optimizers for lr in lrs_of(o) for s in args.seeds]

    def run(o, lr, seed):
        res = train_run(task, steps, o, lr, seed, steps=args.steps, batch=args.batch)
        if seed == args.seeds[0]:
            np.save(args.out / "samples" / f"{o}_{lr:g}.npy", res["drawn"])
        return res

    def report(row, resumed):
        if not resumed:
            print(
                f"{row['optimizer']} lr={row['lr']:g} seed={row['seed']}: val loss "
                f"{row['val_loss']:.4f}, fidelity {row['val_fidelity']:.2f}, prior "
                f"{row['prior']:.2f} ({row['seconds']:.0f} s)",
                flush=True,
            )

    settings = settings_string(
        {"concept": args.concept, "shots": args.shots, "rank": args.rank, "batch": args.batch}
    )
    rows = run_sweep(
        jobs,
        run,
        args.out,
        dataset=f"mnist5k-{args.concept}",
        steps=args.steps,
        settings=settings,
        on_run=report,
        run_fields=RUN_FIELDS,
        tables=(("curves.csv", "curve", CURVE_FIELDS),),
    )
    print(grid_png(args.out, args.optimizers, lrs_of))
    print(*plots(args.out, rows, args.out / "curves.csv"), sep="\n")


if __name__ == "__main__":
    main()
