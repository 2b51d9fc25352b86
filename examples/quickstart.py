"""Quickstart: LoRA fine-tuning with AdamW vs scaled AdamW and SGD vs scaled SGD (same seeds).

A frozen "pretrained" two-layer MLP (Flax NNX, ``nnx.LoRALinear``) must adapt to a new task whose
solution is an ill-conditioned low-rank change of its weights. All runs start from the same weights
and LoRA factors and see the same batches; only the optimizer differs. Finishes in about a minute
on a 2-core CPU.

    python examples/quickstart.py [--steps 300] [--lr 3e-2] [--sgd-lr 0.3] [--rank 4]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import rplora_jax

IN, HIDDEN, OUT = 32, 64, 8


class MLP(nnx.Module):
    def __init__(self, rank: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.LoRALinear(IN, HIDDEN, lora_rank=rank, rngs=rngs)
        self.l2 = nnx.LoRALinear(HIDDEN, OUT, lora_rank=rank, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jnp.tanh(self.l1(x)))


def make_task(student: MLP, rank: int, seed: int = 0) -> tuple[MLP, jax.Array]:
    """Teacher = the student's base weights plus an ill-conditioned rank-`rank` change.

    The change's singular values span two decades, the regime where the paper's preconditioner
    (like ScaledGD) is expected to help: plain methods crawl along the small directions.
    """
    keys = jax.random.split(jax.random.key(seed + 100), 5)
    teacher = nnx.clone(student)
    sigma = jnp.geomspace(1.0, 0.01, rank)
    for layer, (k1, k2) in ((teacher.l1, keys[:2]), (teacher.l2, keys[2:4])):
        n_in, n_out = layer.kernel.shape
        u, _ = jnp.linalg.qr(jax.random.normal(k1, (n_in, rank)))
        v, _ = jnp.linalg.qr(jax.random.normal(k2, (n_out, rank)))
        layer.kernel[...] = layer.kernel[...] + 2.0 * (u * sigma) @ v.T
    return teacher, keys[4]


def fit(
    student: nnx.Module, teacher: nnx.Module, tx: optax.GradientTransformation, batches
) -> list[float]:
    """Trains the LoRA factors (``nnx.LoRAParam``) of ``student`` in place to match ``teacher``.

    One step per batch in ``batches`` (an iterable of inputs), mean squared error between the two
    models' outputs; the base weights stay frozen. Returns the training loss of every step.
    """
    optimizer = nnx.Optimizer(student, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(student, optimizer, x):
        def loss_fn(model):
            return jnp.mean((model(x) - teacher(x)) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(student)
        optimizer.update(student, grads)
        return loss

    return [float(step(student, optimizer, x)) for x in batches]


def train(tx: optax.GradientTransformation, steps: int, rank: int, seed: int = 0) -> list[float]:
    student = MLP(rank, rngs=nnx.Rngs(seed))  # its kernels play the frozen pretrained weights
    teacher, data_key = make_task(student, rank, seed)
    keys = jax.random.split(data_key, steps)
    return fit(student, teacher, tx, (jax.random.normal(key, (128, IN)) for key in keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-2, help="AdamW learning rate")
    parser.add_argument("--sgd-lr", type=float, default=0.3, help="SGD learning rate")
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args()

    model = MLP(args.rank, rngs=nnx.Rngs(0))
    print("LoRA pairs the preconditioner will use:")
    for pair in rplora_jax.find_lora_pairs(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))):
        print(f"  {pair.a_path} / {pair.b_path}  rank {pair.rank}")

    runs = {
        "adamw": optax.adamw(args.lr),
        "scaled_adamw": rplora_jax.scaled_adamw(args.lr),
        "sgd": optax.sgd(args.sgd_lr),
        "scaled_sgd": rplora_jax.scaled_sgd(args.sgd_lr),
    }
    curves = {name: train(tx, args.steps, args.rank) for name, tx in runs.items()}
    checkpoints = sorted({0, args.steps // 10, args.steps // 4, args.steps // 2, args.steps - 1})
    print(
        f"\nTraining loss (MSE), rank {args.rank}, AdamW lr {args.lr}, SGD lr {args.sgd_lr}, "
        "same seeds and batches:"
    )
    print(f"{'step':>6} | " + " | ".join(f"{name:>12}" for name in curves))
    for i in checkpoints:
        print(f"{i + 1:>6} | " + " | ".join(f"{curves[n][i]:12.3e}" for n in curves))
    for base in ("adamw", "sgd"):
        ratio = curves[base][-1] / curves[f"scaled_{base}"][-1]
        print(f"final loss {base} / scaled_{base}: {ratio:.1f}x")


if __name__ == "__main__":
    main()
