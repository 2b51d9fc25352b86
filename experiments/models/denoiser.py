"""A small prompt-conditioned diffusion model for 28 x 28 digits, and the classifier that scores
its samples.

:class:`Denoiser` is a DiT (Peebles & Xie, 2023): 4 x 4 patches (49 tokens), blocks of
``nn.MultiHeadDotProductAttention`` and an MLP of ``nn.Dense`` layers (the LoRA targets,
:data:`LORA_TARGETS`), conditioned on the time and the prompt by adaLN-Zero. It predicts the
velocity ``v`` (Salimans & Ho, 2022) of a diffusion with the cosine schedule of Nichol &
Dhariwal (2021) in continuous time, and :func:`sample` runs deterministic DDIM with
classifier-free guidance.

A prompt is one token: ``null`` (unconditional), a digit's name, or one of the
:data:`NEW_TOKENS` a custom concept is taught as. The digits' and the null token's embeddings are
``prompt_embedding``; the new tokens' are a separate leaf, ``new_token_embedding``, so a concept
run can train them alone (DreamBooth / Textual Inversion's new token) beside the LoRA factors.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from experiments.data.images import DIGIT_NAMES

NULL = 0
NEW_TOKENS = ("<v1>", "<v2>", "<v3>", "<v4>")
TOKENS = ("null", *DIGIT_NAMES, *NEW_TOKENS)
LORA_TARGETS = r"block_\d+/(attention/(query|key|value|out)|mlp_(in|out))"
PATCH, SIDE = 4, 28


def token(name: str) -> int:
    """The prompt token of a digit's name, ``"null"`` or a new token."""
    return TOKENS.index(name)


def digit_token(digit: int) -> int:
    return 1 + digit


def _modulated(x, shift, scale):
    return nn.LayerNorm(use_bias=False, use_scale=False)(x) * (1.0 + scale) + shift


class Block(nn.Module):
    """Pre-norm attention and MLP, each modulated and gated by the condition (adaLN-Zero: the
    gates start at 0, so every block starts as the identity)."""

    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x, cond):
        d = x.shape[-1]
        zero = nn.initializers.zeros
        mod = nn.Dense(6 * d, kernel_init=zero, name="modulation")(nn.silu(cond))[:, None]
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        h = _modulated(x, shift1, scale1)
        x = x + gate1 * nn.MultiHeadDotProductAttention(self.heads, name="attention")(h, h)
        h = nn.Dense(self.mlp, name="mlp_in")(_modulated(x, shift2, scale2))
        return x + gate2 * nn.Dense(d, name="mlp_out")(nn.gelu(h))


def _time_features(t: jax.Array, dim: int) -> jax.Array:
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
    angles = 1000.0 * t[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Denoiser(nn.Module):
    """``v_hat = Denoiser()(x_t, t, prompt)``: ``x_t (b, 28, 28)``, ``t (b,)`` in [0, 1],
    ``prompt (b,)`` token ids."""

    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp: int = 384

    @nn.compact
    def __call__(self, x, t, prompt):
        b, n = x.shape[0], SIDE // PATCH
        patches = x.reshape(b, n, PATCH, n, PATCH).transpose(0, 1, 3, 2, 4)
        h = nn.Dense(self.dim, name="patch_in")(patches.reshape(b, n * n, PATCH * PATCH))
        h = h + self.param("position", nn.initializers.normal(0.02), (n * n, self.dim))[None]
        time = nn.Dense(self.dim, name="time_in")(_time_features(t, self.dim))
        time = nn.Dense(self.dim, name="time_out")(nn.silu(time))
        embed = self.param("prompt_embedding", nn.initializers.normal(1.0), (11, self.dim))
        new = self.param(
            "new_token_embedding", nn.initializers.normal(1.0), (len(NEW_TOKENS), self.dim)
        )
        cond = time + jnp.concatenate([embed, new])[prompt]
        for i in range(self.depth):
            h = Block(self.heads, self.mlp, name=f"block_{i}")(h, cond)
        shift, scale = jnp.split(
            nn.Dense(2 * self.dim, kernel_init=nn.initializers.zeros, name="out_modulation")(
                nn.silu(cond)
            )[:, None],
            2,
            axis=-1,
        )
        out = nn.Dense(PATCH * PATCH, kernel_init=nn.initializers.zeros, name="patch_out")(
            _modulated(h, shift, scale)
        )
        out = out.reshape(b, n, n, PATCH, PATCH).transpose(0, 1, 3, 2, 4)
        return out.reshape(b, SIDE, SIDE)


def alpha_bar(t: jax.Array) -> jax.Array:
    """The cosine schedule's signal fraction at time ``t`` (1 at ``t = 0``, 0 at ``t = 1``)."""
    return jnp.cos((t + 0.008) / 1.008 * jnp.pi / 2) ** 2


def noised(x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, images scaled from [0, 1] to [-1, 1]."""
    a = alpha_bar(t)[:, None, None]
    return jnp.sqrt(a) * (2.0 * x0 - 1.0) + jnp.sqrt(1.0 - a) * eps


def velocity(x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """The target ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho, 2022): unlike the
    noise, it keeps the clean image recoverable at every time, ``x0 = sqrt(abar) x_t - sqrt(1 -
    abar) v``."""
    a = alpha_bar(t)[:, None, None]
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * (2.0 * x0 - 1.0)


def denoising_loss(model, params, x0, prompt, key, *, drop_prompt: float = 0.0):
    """Mean squared error of the predicted velocity at a uniform random time; with
    ``drop_prompt``, that fraction of prompts becomes ``null`` (for classifier-free guidance)."""
    k_t, k_eps, k_drop = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (x0.shape[0],), minval=1e-3, maxval=1.0 - 1e-3)
    eps = jax.random.normal(k_eps, x0.shape)
    prompt = jnp.where(jax.random.uniform(k_drop, prompt.shape) < drop_prompt, NULL, prompt)
    pred = model.apply(params, noised(x0, t, eps), t, prompt)
    return jnp.mean((pred - velocity(x0, t, eps)) ** 2)


@partial(jax.jit, static_argnums=0)
def _noise_error(model, params, x0, prompt, t, eps):
    ts = jnp.full((x0.shape[0],), t, jnp.float32)
    pred = model.apply(params, noised(x0, ts, eps), ts, prompt)
    return jnp.mean((pred - velocity(x0, ts, eps)) ** 2)


def fixed_denoising_loss(model, params, x0, prompt, *, times: int = 8, seed: int = 0):
    """The denoising (velocity) error on a fixed grid of ``times`` times and fixed noise:
    comparable across runs (the held-out metric)."""
    rng = np.random.default_rng(seed)
    errors = [
        _noise_error(model, params, x0, prompt, t, rng.standard_normal(x0.shape, np.float32))
        for t in (np.arange(times) + 0.5) / times
    ]
    return float(np.mean(errors))


@partial(jax.jit, static_argnums=0, static_argnames=("steps", "guidance"))
def sample(model, params, prompt, key, *, steps: int = 30, guidance: float = 2.0):
    """DDIM (deterministic given the initial noise from ``key``) with classifier-free guidance
    ``v_null + guidance * (v_prompt - v_null)``; returns images in [0, 1]."""
    b = prompt.shape[0]
    x = jax.random.normal(key, (b, SIDE, SIDE))
    null = jnp.full_like(prompt, NULL)
    times = jnp.linspace(1.0 - 1e-3, 0.0, steps + 1)

    def step(x, ts):
        t, s = jnp.full((b,), ts[0]), jnp.full((b,), ts[1])
        both = model.apply(
            params,
            jnp.concatenate([x, x]),
            jnp.concatenate([t, t]),
            jnp.concatenate([prompt, null]),
        )
        v = both[b:] + guidance * (both[:b] - both[b:])
        a_t, a_s = alpha_bar(t)[:, None, None], alpha_bar(s)[:, None, None]
        x0 = jnp.clip(jnp.sqrt(a_t) * x - jnp.sqrt(1 - a_t) * v, -1.0, 1.0)
        eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(1 - a_t)  # the noise the clipped x0 implies
        return jnp.sqrt(a_s) * x0 + jnp.sqrt(1 - a_s) * eps, x0

    _, x0 = jax.lax.scan(step, x, jnp.stack([times[:-1], times[1:]], axis=1))
    return (x0[-1] + 1.0) / 2.0  # the last prediction of the clean image


class Classifier(nn.Module):
    """A small CNN over the 10 digits: scores whether samples show the digit they were asked
    for."""

    @nn.compact
    def __call__(self, x):
        h = x[..., None]
        for features in (32, 64):
            h = nn.relu(nn.Conv(features, (3, 3), name=f"conv_{features}")(h))
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = nn.relu(nn.Dense(128, name="hidden")(h.reshape(h.shape[0], -1)))
        return nn.Dense(10, name="logits")(h)
