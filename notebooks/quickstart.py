# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # rplora_jax quickstart
#
# This notebook fine-tunes a small LoRA model twice, once with `optax.adamw` and once with
# `rplora_jax.scaled_adamw` (the Riemannian-preconditioned AdamW of Zhang & Pilanci, ICML 2024),
# from the same weights and on the same batches, and plots both loss curves. It builds the model
# in Flax NNX and in Flax linen, shows which LoRA factor pairs the preconditioner found, and then
# merges the adapter into the base weights and saves it to a file.
#
# **Install.** From a checkout of the repository, `pip install -e ".[examples]" matplotlib`
# installs the library with Flax and safetensors, and matplotlib for the plots. It runs on a CPU
# in under a minute.
#
# Set the environment variable `RPLORA_NOTEBOOK_SMOKE=1` to run it with fewer steps. CI does this
# to check that the notebook still runs.

# %%
import os
import sys
import tempfile
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import rplora_jax
from rplora_jax import adapters
from rplora_jax.layers.lora_linen import LoRADense
from rplora_jax.layers.lora_nnx import LoRALinear
from rplora_jax.partition import print_trainable_parameters

# The repository root (the notebook runs from notebooks/), to reuse the examples' training loop.
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "examples/quickstart.py").exists())
sys.path.insert(0, str(ROOT))
from examples.quickstart import fit  # noqa: E402

SMOKE = os.environ.get("RPLORA_NOTEBOOK_SMOKE") == "1"
STEPS = 30 if SMOKE else 300
print(
    f"rplora_jax {rplora_jax.__version__}, jax {jax.__version__}, optax {optax.__version__}, "
    f"flax {flax.__version__}; {STEPS} steps"
)

# %% [markdown]
# ## The task
#
# A "pretrained" two-layer MLP, `x -> W2 tanh(W1 x)`, has to adapt to a new task. The new task
# is the same MLP, but with each weight changed by a rank-4 matrix whose singular values span two
# decades (1 to 0.01). The change is ill-conditioned on purpose, because that is where the
# preconditioner should help: plain gradient methods move slowly along the small directions.
# A rank-4 LoRA adapter on both layers can represent the change exactly. All batches are drawn in
# advance, so every optimizer sees the same data.

# %%
IN, HIDDEN, OUT, RANK, BATCH = 32, 64, 8, 4, 128
LORA = rplora_jax.LoRAConfig(rank=RANK)  # scale 1 (alpha=None)


def low_rank_change(key, shape, rank=RANK):
    """2 * U diag(sigma) V^T with orthonormal U, V and sigma from 1 down to 0.01."""
    ku, kv = jax.random.split(key)
    u, _ = np.linalg.qr(np.asarray(jax.random.normal(ku, (shape[0], rank))))
    v, _ = np.linalg.qr(np.asarray(jax.random.normal(kv, (shape[1], rank))))
    return jnp.asarray(2.0 * (u * np.geomspace(1.0, 0.01, rank)) @ v.T, jnp.float32)


data_rng = np.random.default_rng(0)
batches = jnp.asarray(data_rng.standard_normal((STEPS, BATCH, IN), dtype=np.float32))
x_test = jnp.asarray(data_rng.standard_normal((1024, IN), dtype=np.float32))
print(batches.shape)


# %% [markdown]
# ## Flax NNX
#
# `LoRALinear` (from `rplora_jax.layers.lora_nnx`) is an `nnx.Linear` plus `lora_a (in, r)` and
# `lora_b (r, out)`, both stored as `nnx.LoRAParam`. Because `lora_b` starts at zero, the model
# starts out equal to its base. The teacher is a copy of the student whose kernels include the
# low-rank change.


# %%
class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.l1 = LoRALinear(IN, HIDDEN, lora=LORA, rngs=rngs)
        self.l2 = LoRALinear(HIDDEN, OUT, lora=LORA, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


student = MLP(rngs=nnx.Rngs(0))
teacher = nnx.clone(student)
for layer, key in zip((teacher.l1, teacher.l2), jax.random.split(jax.random.key(1)), strict=True):
    layer.kernel[...] = layer.kernel[...] + low_rank_change(key, layer.kernel.shape)

_ = print_trainable_parameters(student)

# %% [markdown]
# The preconditioner works on pairs of factors. `find_lora_pairs` shows the pairs it will use.
# It matches sibling leaves named `lora_a`/`lora_b` here, and it also understands the naming of
# qwix, gemma and PEFT (see `rplora_jax.pairing`). If a model has no pairs, you get a `ValueError`
# instead of a silent no-op.

# %%
for pair in rplora_jax.find_lora_pairs(nnx.state(student, nnx.LoRAParam)):
    print(pair)


# %% [markdown]
# Both optimizers train only the `nnx.LoRAParam`s (`wrt=nnx.LoRAParam`). `scaled_adamw` is
# `optax.chain(riemannian_preconditioner(reg), optax.adamw(...))`. The preconditioner multiplies
# `a`'s gradient by `inv(b bᵀ + reg·I)` and `b`'s gradient by `inv(aᵀ a + reg·I)`. Note that
# `rplora_jax.DEFAULT_REG` is `1e-2`, PEFT's value, rather than the `1e-6` of the paper's code.
# At the start `b = 0`, so `b bᵀ` is zero and a tiny `reg` would scale `a`'s first gradients up by
# about `1/reg`. Pass `reg=1e-6` to reproduce the paper's code exactly.


# %%
def train_nnx(tx, steps=STEPS):
    """Trains a fresh student's LoRA factors on the first ``steps`` batches (``fit`` comes from
    ``examples/quickstart.py``); every optimizer starts from the same weights and factors."""
    model = MLP(rngs=nnx.Rngs(0))
    return model, np.array(fit(model, teacher, tx, batches[:steps]))


print("DEFAULT_REG =", rplora_jax.DEFAULT_REG)
LR = 3e-2
nnx_runs = {
    "optax.adamw": train_nnx(optax.adamw(LR)),
    "rplora_jax.scaled_adamw": train_nnx(rplora_jax.scaled_adamw(LR)),
}
for name, (model, losses) in nnx_runs.items():
    test_loss = float(jnp.mean((model(x_test) - teacher(x_test)) ** 2))
    print(f"{name:>24}: first loss {losses[0]:.3e}, test loss after {STEPS} steps {test_loss:.3e}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, (_, losses) in nnx_runs.items():
    ax.semilogy(np.arange(1, len(losses) + 1), losses, label=name)
ax.set(
    xlabel="step",
    ylabel="training loss (MSE)",
    title=f"NNX, rank-{RANK} LoRA, lr {LR}, same data and init",
)
ax.grid(True, which="both", alpha=0.3)
ax.legend()
plt.show()


# %% [markdown]
# In the committed run, plain AdamW descends faster for the first ~200 steps and then levels off
# around 5e-5. Scaled AdamW keeps descending and ends with a test loss about 7x lower. Both runs
# use a single learning rate here; `lr_robustness.ipynb` shows how the comparison changes across
# learning rates and seeds.

# %% [markdown]
# ## Flax linen
#
# `LoRADense` (from `rplora_jax.layers.lora_linen`) subclasses `nn.Dense`: `kernel` and `bias`
# keep the names and shapes of `nn.Dense`, so pretrained weights load unchanged, and
# `lora_a`/`lora_b` are stored next to them. `rplora_jax.freeze_base` wraps any optimizer so that
# only the LoRA factors train. The base weights get zero updates, and no optimizer state is kept
# for them.
# Here the same task is trained with the same weights, so the linen run matches the NNX run.


# %%
class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(LoRADense(HIDDEN, lora=LORA, name="l1")(x))
        return LoRADense(OUT, lora=LORA, name="l2")(h)


linen_model = LinenMLP()
# Start from the NNX student's weights, so both APIs solve exactly the same problem.
init_params = nnx.to_pure_dict(nnx.state(student, nnx.Param))
teacher_params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
print(jax.tree.map(jnp.shape, init_params))
print([pair.a_path for pair in rplora_jax.find_lora_pairs(init_params)])
_ = print_trainable_parameters(init_params)


def train_linen(tx, steps=STEPS):
    tx = rplora_jax.freeze_base(tx)

    def loss_fn(params, x):
        prediction = linen_model.apply({"params": params}, x)
        return jnp.mean((prediction - linen_model.apply({"params": teacher_params}, x)) ** 2)

    def step(carry, x):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, x)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    run = jax.jit(lambda params: jax.lax.scan(step, (params, tx.init(params)), batches[:steps]))
    (params, _), losses = run(init_params)
    return params, np.asarray(losses)


linen_runs = {
    "optax.adamw": train_linen(optax.adamw(LR)),
    "rplora_jax.scaled_adamw": train_linen(rplora_jax.scaled_adamw(LR)),
}
for name, (_, losses) in linen_runs.items():
    gap = np.max(np.abs(losses - nnx_runs[name][1]) / nnx_runs[name][1])
    print(f"{name:>24}: final loss {losses[-1]:.3e} (largest relative gap to NNX: {gap:.1e})")

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, (_, losses) in linen_runs.items():
    ax.semilogy(np.arange(1, len(losses) + 1), losses, label=name)
ax.set(xlabel="step", ylabel="training loss (MSE)", title="linen + freeze_base, same task")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## Merge and save the adapter
#
# For serving, merging folds `s·a@b` into each kernel. The result has exactly the parameters of
# the model without LoRA and runs at the base model's cost. For NNX, `rplora_jax.merge` returns
# a copy whose LoRA layers are replaced by plain `nnx.Linear` layers. For linen,
# `rplora_jax.merge(params, scale=...)` returns the variables of the same network built from
# `nn.Dense`.

# %%
trained, _ = nnx_runs["rplora_jax.scaled_adamw"]
merged = rplora_jax.merge(trained)
print(type(trained.l1).__name__, "->", type(merged.l1).__name__)
gap = float(jnp.max(jnp.abs(merged(x_test) - trained(x_test))))
print(f"NNX: max |merged - LoRA| output difference {gap:.1e}")
assert gap < 1e-5


class DenseMLP(nn.Module):  # the same network without LoRA
    @nn.compact
    def __call__(self, x):
        return nn.Dense(OUT, name="l2")(jnp.tanh(nn.Dense(HIDDEN, name="l1")(x)))


linen_params, _ = linen_runs["rplora_jax.scaled_adamw"]
merged_params = rplora_jax.merge(linen_params, scale=LORA.scale)
print({name: sorted(layer) for name, layer in merged_params.items()})
gap = float(
    jnp.max(
        jnp.abs(
            DenseMLP().apply({"params": merged_params}, x_test)
            - linen_model.apply({"params": linen_params}, x_test)
        )
    )
)
print(f"linen: max |merged - LoRA| output difference {gap:.1e}")
assert gap < 1e-5

# %% [markdown]
# An adapter is small: only the factors are saved, as safetensors, together with string
# metadata. Load it into a freshly initialised model (its factors are overwritten) to get the
# fine-tuned model back.

# %%
folder = tempfile.mkdtemp()
file = os.path.join(folder, "adapter.safetensors")
saved = rplora_jax.save_adapter(file, trained, metadata={"rank": str(RANK), "task": "quickstart"})
print({path: value.shape for path, value in saved.items()})
print(f"{os.path.getsize(file):,} bytes;", sorted(adapters.read_adapter_metadata(file).items()))

fresh = MLP(rngs=nnx.Rngs(0))  # base weights + untrained factors
nnx.update(fresh, rplora_jax.load_adapter(file, into=nnx.state(fresh, nnx.LoRAParam)))
gap = float(jnp.max(jnp.abs(fresh(x_test) - trained(x_test))))
print(f"reloaded adapter: max output difference {gap:.1e}")
assert gap == 0.0

linen_file = os.path.join(folder, "linen_adapter.safetensors")
rplora_jax.save_adapter(linen_file, linen_params)
restored = rplora_jax.load_adapter(linen_file, into=init_params)
assert all(
    np.array_equal(restored[n][k], linen_params[n][k]) for n in restored for k in restored[n]
)

# %% [markdown]
# ## Next
#
# * `lr_robustness.ipynb` sweeps the learning rate for AdamW / scaled AdamW and SGD / scaled SGD.
# * `rplora_jax.inject_linen` / `inject_nnx` add LoRA to an existing model, selecting the
#   layers with a regex (see `examples/lora_transformer.py`).
# * Sharded training: `rplora_jax.sharding`, `examples/sharded_training.py`.
