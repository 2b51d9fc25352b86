"""LoRA on a small multi-layer transformer, without touching the model's code, in linen and NNX.

A pre-norm causal self-attention language model (query/key/value/out projections and a two-layer
MLP per block) is built as if it were a pretrained model; LoRA is injected by a regex on module
paths; only the factors are trained with ``rplora_jax.scaled_adamw`` on a synthetic next-token
task; the result is merged for serving and the adapter saved on its own.

Run::

    python examples/lora_transformer.py

The tests (``tests/layers/test_inject.py``) import this file for its models and training loops.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import rplora_jax
from rplora_jax.partition import print_trainable_parameters

# Every projection of every block: attention and MLP (PEFT's target_modules="all-linear" minus
# the LM head). The regex must match the whole module path.
LINEN_TARGETS = r"(blocks|block_\d+)/(attn/(query|key|value|out)|mlp/(fc1|fc2))"
NNX_TARGETS = r"blocks/\d+/(attn/(query|key|value|out)|mlp/(fc1|fc2))"
LORA = rplora_jax.LoRAConfig(rank=4, alpha=8.0)
LR = 1e-2


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 16
    seq_len: int = 12
    d_model: int = 32
    num_heads: int = 4
    mlp_dim: int = 64
    num_layers: int = 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def make_batch(key: jax.Array, cfg: Config, batch: int = 16) -> jax.Array:
    """Token sequences of the map ``t -> (5 t + 3) mod vocab`` from random starts."""
    start = np.random.default_rng(np.asarray(jax.random.key_data(key))).integers(
        0, cfg.vocab, batch
    )
    tokens = [start]
    for _ in range(cfg.seq_len - 1):
        tokens.append((5 * tokens[-1] + 3) % cfg.vocab)
    return jnp.asarray(np.stack(tokens, axis=1), dtype=jnp.int32)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _causal_attention(q, k, v):
    """q, k, v: (batch, time, heads, head_dim)."""
    t = q.shape[1]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
    mask = jnp.tril(jnp.ones((t, t), dtype=bool))[None, None]
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


# --- linen --------------------------------------------------------------------------------------


class LinenAttention(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        proj = lambda name: nn.DenseGeneral((c.num_heads, c.head_dim), name=name)(x)
        o = _causal_attention(proj("query"), proj("key"), proj("value"))
        return nn.DenseGeneral(c.d_model, axis=(-2, -1), name="out")(o)


class LinenMLP(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(self.cfg.mlp_dim, name="fc1")(x))
        return nn.Dense(self.cfg.d_model, name="fc2")(h)


class LinenBlock(nn.Module):
    cfg: Config

    @nn.compact
    def __call__(self, x, _=None):
        x = x + LinenAttention(self.cfg, name="attn")(nn.LayerNorm(name="ln1")(x))
        x = x + LinenMLP(self.cfg, name="mlp")(nn.LayerNorm(name="ln2")(x))
        return x, None


class LinenTransformer(nn.Module):
    """Causal LM. ``scan_layers=True`` stacks the blocks with ``nn.scan`` (path ``blocks/...``)."""

    cfg: Config
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        x = nn.Embed(c.vocab, c.d_model, name="embed")(tokens)
        pos = self.param("pos", nn.initializers.normal(0.02), (c.seq_len, c.d_model))
        x = x + pos[None, : tokens.shape[1]]
        if self.scan_layers:
            blocks = nn.scan(
                LinenBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=c.num_layers,
            )
            x, _ = blocks(c, name="blocks")(x, None)
        else:
            for i in range(c.num_layers):
                x, _ = LinenBlock(c, name=f"block_{i}")(x)
        return nn.Dense(c.vocab, name="lm_head")(nn.LayerNorm(name="ln_f")(x))


def train_linen(steps: int = 30, *, scan_layers: bool = False, seed: int = 0, cfg=Config()):
    """Injects LoRA into a (stand-in for a pretrained) linen transformer and trains it.

    Returns:
      ``(lora, pretrained, variables, losses)``: the ``LinenLoRA`` (see ``inject_linen``), the
      original variables, the trained variables and the loss per step.
    """
    model = LinenTransformer(cfg, scan_layers=scan_layers)
    k_init, k_lora, k_data = jax.random.split(jax.random.key(seed), 3)
    example = make_batch(k_data, cfg)
    pretrained = jax.jit(model.init)(k_init, example)
    lora = rplora_jax.inject_linen(model, LINEN_TARGETS, LORA)
    variables = lora.init_from(pretrained, k_lora, example)
    tx = rplora_jax.freeze_base(rplora_jax.scaled_adamw(LR, weight_decay=0.0))
    opt_state = tx.init(variables)

    @jax.jit
    def step(variables, opt_state, tokens):
        def loss_fn(v):
            return next_token_loss(lora.apply(v, tokens), tokens)

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state, loss

    losses = []
    for i in range(steps):
        tokens = make_batch(jax.random.fold_in(k_data, i), cfg)
        variables, opt_state, loss = step(variables, opt_state, tokens)
        losses.append(float(loss))
    return lora, pretrained, variables, losses


# --- NNX ----------------------------------------------------------------------------------------


class NNXAttention(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        qkv = ("btd,dnh->btnh", (cfg.d_model, cfg.num_heads, cfg.head_dim))
        bias = (cfg.num_heads, cfg.head_dim)
        self.query = nnx.Einsum(*qkv, bias, rngs=rngs)
        self.key = nnx.Einsum(*qkv, bias, rngs=rngs)
        self.value = nnx.Einsum(*qkv, bias, rngs=rngs)
        self.out = nnx.Einsum(
            "btnh,nhd->btd", (cfg.num_heads, cfg.head_dim, cfg.d_model), (cfg.d_model,), rngs=rngs
        )

    def __call__(self, x):
        return self.out(_causal_attention(self.query(x), self.key(x), self.value(x)))


class NNXMLP(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(cfg.d_model, cfg.mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.mlp_dim, cfg.d_model, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.gelu(self.fc1(x)))


class NNXBlock(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.attn = NNXAttention(cfg, rngs=rngs)
        self.ln2 = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.mlp = NNXMLP(cfg, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class NNXTransformer(nnx.Module):
    """Causal LM; attention projections are ``nnx.Einsum``, the MLP ``nnx.Linear``."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (cfg.seq_len, cfg.d_model)) * 0.02)
        self.blocks = nnx.List([NNXBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.pos[...][None, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def train_nnx(steps: int = 30, *, seed: int = 0, cfg=Config()):
    """Injects LoRA into an NNX transformer in place and trains only ``nnx.LoRAParam``.

    Returns:
      ``(model, original, losses)``: the trained LoRA model, an untouched copy of the original
      model and the loss per step.
    """
    model = NNXTransformer(cfg, rngs=nnx.Rngs(seed))
    original = nnx.clone(model)
    rplora_jax.inject_nnx(model, NNX_TARGETS, LORA, rngs=nnx.Rngs(seed + 1))
    optimizer = nnx.Optimizer(
        model, rplora_jax.scaled_adamw(LR, weight_decay=0.0), wrt=nnx.LoRAParam
    )

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(m):
            return next_token_loss(m(tokens), tokens)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(seed + 2)
    losses = [
        float(step(model, optimizer, make_batch(jax.random.fold_in(key, i), cfg)))
        for i in range(steps)
    ]
    return model, original, losses


def main() -> None:
    lora, _pretrained, variables, losses = train_linen()
    print(f"linen: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print_trainable_parameters(variables)
    tokens = make_batch(jax.random.key(9), Config())
    merged = lora.merge(variables)  # the original model's variables, LoRA folded in
    diff = jnp.abs(lora.module.apply(merged, tokens) - lora.apply(variables, tokens)).max()
    print(f"linen: merged vs unmerged max |diff| = {float(diff):.2e}")
    with tempfile.TemporaryDirectory() as tmp:
        file = os.path.join(tmp, "adapter.safetensors")
        metadata = {"rank": str(LORA.rank), "alpha": str(LORA.alpha)}
        rplora_jax.save_adapter(file, variables, metadata=metadata)
        print(f"linen: adapter file {os.path.getsize(file):,} bytes")

    model, _original, losses = train_nnx()
    print(f"nnx:   loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print_trainable_parameters(model)
    merged_model = rplora_jax.merge(model)
    diff = jnp.abs(merged_model(tokens) - model(tokens)).max()
    print(f"nnx:   merged vs unmerged max |diff| = {float(diff):.2e}")


if __name__ == "__main__":
    main()
