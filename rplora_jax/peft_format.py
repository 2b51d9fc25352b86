"""Adapters in HuggingFace PEFT's format: save for ``PeftModel.from_pretrained``, load PEFT's.

A PEFT LoRA adapter is a directory with two files:

* ``adapter_model.safetensors``: for every adapted ``nn.Linear`` named ``name`` in the PyTorch
  model, ``base_model.model.<name>.lora_A.weight`` with shape ``(r, in)`` and
  ``base_model.model.<name>.lora_B.weight`` with shape ``(out, r)`` (PyTorch layout,
  ``W = W0 + s * B @ A``); this library's Flax-layout factors are their transposes,
  ``a = A.T: (in, r)`` and ``b = B.T: (r, out)``.
* ``adapter_config.json``: ``peft_type="LORA"``, ``r``, ``lora_alpha``, ``use_rslora``,
  ``target_modules``, ``lora_dropout`` and the rest of PEFT's ``LoraConfig``. PEFT's scale is
  ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), the same definition as
  `rplora_jax.LoRAConfig.scale`.

The PyTorch module name of each pair comes from ``module_names``: by default its Flax module path
without a leading ``params``, joined with ``.`` (``params/encoder/layer_0/query`` ->
``encoder.layer_0.query``; an ``nnx.List`` index stays a number, as in a
``torch.nn.ModuleList``: ``blocks/0/query`` -> ``blocks.0.query``). For other names pass a
dict ``{flax_module_path: torch_name}`` or a callable ``flax_module_path -> torch_name``, for
example built on [`default_module_name`][rplora_jax.peft_format.default_module_name].

What has no PEFT equivalent is refused with a ``ValueError`` naming the path: factors with several
input or output axes (``DenseGeneral`` / ``Einsum`` LoRA, e.g. ``a: (heads, head_dim, r)``), ranks
other than the config's ``rank``, and (unless ``module_names`` is a callable taking the layer index)
stacked pairs from ``nn.scan`` / ``nnx.vmap``.

Needs ``safetensors`` (the ``adapters`` extra); PEFT and PyTorch are not needed to write or read
these files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from rplora_jax._peft import (
    CONFIG_NAME,
    Module,
    ModuleNames,
    check_module_names,
    lora_config,
    plan,
    preview,
    read_config,
)
from rplora_jax._peft import default_module_name as default_module_name
from rplora_jax._peft import hf_decoder_names as hf_decoder_names
from rplora_jax._trees import as_param_tree, is_nnx_module
from rplora_jax.adapters import _replace_factors
from rplora_jax.pairing import RuleSpec

if TYPE_CHECKING:
    from rplora_jax.layers.config import LoRAConfig

_WEIGHTS_NAME = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."


def _check_nnx_scales(params: Any, scale: float, theirs: str, where: str) -> None:
    """For an ``nnx.Module``, its LoRA layers' stored scales must be ``scale``: PEFT's file has
    one ``lora_alpha / r`` for every module, and a mismatch would silently give another model."""
    if not is_nnx_module(params):
        return
    from rplora_jax.layers.lora_nnx import _layer_scales

    wrong = {p: s for p, s in _layer_scales(params).items() if not math.isclose(s, scale)}
    if wrong:
        raise ValueError(
            f"{where}: the model's LoRA layers {preview(sorted(wrong))} have scale "
            f"{preview(sorted(set(wrong.values())))}, but {theirs} has scale {scale} "
            "(alpha / rank, or alpha / sqrt(rank) with rslora; Flax's nnx.LoRALinear has 1). "
            "A PEFT adapter has one scale for every module."
        )


def _swap(x: Any) -> Any:
    return jnp.swapaxes(jnp.asarray(x), -1, -2)


def _auto_targets(modules: list[Module], leaves: Mapping[str, Any]) -> list[str]:
    """PEFT's usual suffix names (``["query", "value"]``) when they select exactly the adapted
    layers among the 2-D kernels in the tree; otherwise the full module names."""
    names = sorted({m.name for m in modules})
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    if any(s.isdigit() for s in suffixes):  # "0" of an nn.Sequential also matches "x.0"
        return names
    lora_paths = {m.path for m in modules}
    flax_leaves = {p.rsplit("/", 1)[-1] for p in lora_paths}
    for path, leaf in leaves.items():
        module, _, last = path.rpartition("/")
        if (
            last in ("kernel", "weight")
            and module not in lora_paths
            and module.rsplit("/", 1)[-1] in flax_leaves
            and np.ndim(leaf) >= 2
        ):
            return names
    return suffixes


def _json_number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(
    directory: str | os.PathLike,
    params: Any,
    lora: LoRAConfig,
    *,
    module_names: ModuleNames = None,
    target_modules: str | Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    model_modules: Iterable[str] | None = None,
) -> dict[str, jax.Array]:
    """Saves the LoRA factors of ``params`` as a PEFT adapter directory.

    ``peft.PeftModel.from_pretrained(torch_model, directory)`` then loads it onto the equivalent
    PyTorch model (Flax ``kernel`` = PyTorch ``weight.T``). The factors keep their dtype
    (bfloat16 included).

    Args:
      directory: the adapter directory (created if needed); gets ``adapter_model.safetensors``
        and ``adapter_config.json``.
      params: parameters with LoRA factors (linen variables or their ``params``, ``nnx.State``,
        an ``nnx.Module``); only 2-D factors per layer (``a: (in, r)``, ``b: (r, out)``).
      lora: the [`LoRAConfig`][rplora_jax.layers.config.LoRAConfig] the factors were trained with:
        ``rank`` is PEFT's ``r``, ``alpha`` its ``lora_alpha`` (``None``, scale 1, is written as
        ``lora_alpha = r``), ``rslora`` its ``use_rslora``, ``dropout_rate`` its ``lora_dropout``.
      module_names: the PyTorch module name of each pair's Flax module path: ``None`` for
        [`default_module_name`][rplora_jax.peft_format.default_module_name], a dict ``{flax_path:
        torch_name}`` (with or without the leading ``params/``), or a callable ``flax_path ->
        torch_name``. Stacked pairs (``nn.scan`` / ``nnx.vmap``, ``a: (L, in, r)``) need a callable
        ``(flax_path, index) -> torch_name`` with ``index`` a tuple of ints, e.g. ``lambda p, i:
        f"layers.{i[0]}.{p.rsplit('/', 1)[-1]}"``; it is called with one argument for the unstacked
        pairs. [`hf_decoder_names`][rplora_jax.peft_format.hf_decoder_names] is that callable
        for HuggingFace decoders (Llama, Mistral, Qwen, Gemma).
      target_modules: PEFT's ``target_modules`` as written; ``None`` writes the modules' last
        name components (``["query", "value"]``, as PEFT users write them) when no other 2-D
        kernel in ``params`` has the same last name, else the full module names. PEFT adds
        LoRA to every module these select, so pass the full names if ``params`` holds only the
        factors and the model has same-named layers without LoRA.
      base_model_name_or_path: written to the config (the Hub id or path of the base model).
      task_type: PEFT's ``task_type`` (e.g. ``"CAUSAL_LM"``); ``None`` for a plain
        ``PeftModel``.
      rules: pairing rules (see [`find_lora_pairs`][rplora_jax.pairing.find_lora_pairs]).
      model_modules: the PyTorch model's module names, if you have the model at hand
        (``[name for name, _ in model.named_modules()]``): every module the adapter names must
        be one of them. PEFT loads an adapter whose names match nothing with only a warning,
        and then serves the base model.

    Returns:
      The saved tensors, ``{"base_model.model.<name>.lora_A.weight": array, ...}``.

    Raises:
      ValueError: naming the path, for factors with several input or output axes, a rank other
        than ``lora.rank``, a stacked pair without a callable ``module_names``, a module
        missing from a ``module_names`` dict, two pairs mapped to the same name, or names that
        are not in ``model_modules``.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from rplora_jax.layers.config import LoRAConfig
      >>> params = {"params": {"fc": {"kernel": jnp.zeros((3, 4)), "lora_a": jnp.ones((3, 2)),
      ...                             "lora_b": jnp.ones((2, 4))}}}
      >>> d = tempfile.mkdtemp()
      >>> saved = save_peft_adapter(d, params, LoRAConfig(rank=2, alpha=4.0))
      >>> {k: v.shape for k, v in saved.items()}
      {'base_model.model.fc.lora_A.weight': (2, 3), 'base_model.model.fc.lora_B.weight': (4, 2)}
      >>> sorted(os.listdir(d))
      ['adapter_config.json', 'adapter_model.safetensors']
      >>> peft_config(d).scale
      2.0
      >>> back = load_peft_adapter(d, params)
      >>> bool((back["params"]["fc"]["lora_a"] == params["params"]["fc"]["lora_a"]).all())
      True
    """
    from safetensors.flax import save_file

    where = "save_peft_adapter"
    from rplora_jax.layers.config import _check_lora

    _check_lora(lora, where)
    _check_nnx_scales(params, lora.scale, "lora=", where)
    tree = as_param_tree(params)
    modules, leaves = plan(
        tree, module_names, rules, (lora.rank, "the LoRAConfig's rank is"), where
    )
    if model_modules is not None:
        check_module_names(modules, model_modules, where)
    tensors: dict[str, jax.Array] = {}
    for m in modules:
        a, b = leaves[m.pair.a_path], leaves[m.pair.b_path]
        a, b = jnp.asarray(a)[m.index], jnp.asarray(b)[m.index]
        if m.pair.layout == "flax":
            a, b = _swap(a), _swap(b)
        tensors[f"{_KEY_PREFIX}{m.name}.lora_A.weight"] = jnp.asarray(a)
        tensors[f"{_KEY_PREFIX}{m.name}.lora_B.weight"] = jnp.asarray(b)

    if target_modules is None:
        targets: str | list[str] = _auto_targets(modules, leaves)
    elif isinstance(target_modules, str):
        targets = target_modules
    else:
        targets = sorted(target_modules)
    if lora.alpha is None:  # scale 1
        lora_alpha, use_rslora = lora.rank, False
    else:
        lora_alpha, use_rslora = _json_number(lora.alpha), bool(lora.rslora)
    peft_json = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(lora.rank),
        "lora_alpha": lora_alpha,
        "use_rslora": use_rslora,
        "target_modules": targets,
        "lora_dropout": float(lora.dropout_rate),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }
    os.makedirs(directory, exist_ok=True)
    # "format": "pt" is what PyTorch writers store; transformers checks it on some paths.
    save_file(tensors, os.path.join(directory, _WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(peft_json, f, indent=2, sort_keys=True)
        f.write("\n")
    return tensors


def peft_config(directory: str | os.PathLike) -> LoRAConfig:
    """The [`LoRAConfig`][rplora_jax.layers.config.LoRAConfig] of a PEFT LoRA adapter directory.

    ``r`` -> ``rank``, ``lora_alpha`` -> ``alpha``, ``use_rslora`` -> ``rslora``,
    ``lora_dropout`` -> ``dropout_rate``, so ``.scale`` is PEFT's scaling. Options this library's
    LoRA lacks (DoRA, ``rank_pattern``, trained biases, an initialisation PEFT re-runs on the
    base weight such as PiSSA...) and options it does not know (aLoRA, KaSA...) raise a
    ``ValueError`` naming the field. ``fan_in_fan_out`` (GPT-2's ``Conv1D``) is accepted: it
    transposes only the base weight, which a Flax kernel already stores as ``(in, out)``.

    Args:
      directory: a directory written by PEFT's ``save_pretrained`` or
        [`save_peft_adapter`][rplora_jax.peft_format.save_peft_adapter].

    Returns:
      The config; use it to inject LoRA into the Flax model before
      [`load_peft_adapter`][rplora_jax.peft_format.load_peft_adapter].
    """
    return lora_config(read_config(directory, "peft_config"), "peft_config")


def load_peft_adapter(
    directory: str | os.PathLike,
    into: Any,
    *,
    module_names: ModuleNames = None,
    lora: LoRAConfig | None = None,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
) -> Any:
    """Loads a PEFT LoRA adapter directory into parameters with LoRA factors.

    Every pair of ``into`` must have its ``lora_A`` / ``lora_B`` in the file and every factor
    in the file must belong to a pair of ``into``; shapes must be the transposes. Values are
    cast to the dtype of ``into``'s factors.

    Args:
      directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``
        (PEFT's default; a pickled ``adapter_model.bin`` is not read).
      into: parameters with LoRA factors of the right shapes (their values are ignored), e.g. from
        ``init`` of a model with LoRA injected with
        [`peft_config`][rplora_jax.peft_format.peft_config]'s config, or ``nnx.state(model,
        nnx.LoRAParam)``.
      module_names: the same mapping as for
        [`save_peft_adapter`][rplora_jax.peft_format.save_peft_adapter].
      lora: if given, its rank and scale must equal the adapter's. An ``nnx.Module`` ``into``
        is checked without it (its LoRA layers store their scales); linen variables, plain
        dicts and ``nnx.State`` do not record the scale, so pass ``lora=`` (or the module) to
        have a mismatch, which would silently change the model, caught.
      rules: pairing rules.

    Returns:
      ``into`` with its factors replaced; an ``nnx.Module`` is read as, and gives back, its
      ``nnx.Param`` state (for NNX:
      ``nnx.update(model, load_peft_adapter(d, model))``, which also checks the layers' scales).

    Raises:
      ValueError: for options this library's LoRA lacks, keys missing from the file or without
        a pair in ``into`` (named), shapes that do not fit, or a ``lora`` config (or an NNX
        model's stored scales) that differs.
    """
    from safetensors.flax import load_file

    where = "load_peft_adapter"
    cfg = read_config(directory, where)
    theirs = lora_config(cfg, where)
    given = f"lora_alpha={cfg['lora_alpha']}, use_rslora={cfg.get('use_rslora', False)}"
    if lora is not None and (
        lora.rank != theirs.rank or not math.isclose(lora.scale, theirs.scale)
    ):
        raise ValueError(
            f"{where}: the adapter has r={theirs.rank}, scale {theirs.scale} ({given}) "
            f"but lora= has rank {lora.rank}, scale {lora.scale}."
        )
    _check_nnx_scales(into, theirs.scale, f"the adapter ({given}, r={cfg['r']})", where)
    file = os.path.join(directory, _WEIGHTS_NAME)
    if not os.path.isfile(file):
        hint = ""
        if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            hint = (
                " It has a pickled adapter_model.bin; convert it with torch: "
                "safetensors.torch.save_file(torch.load('adapter_model.bin'), "
                "'adapter_model.safetensors')."
            )
        raise FileNotFoundError(f"{where}: no {_WEIGHTS_NAME} in '{directory}'.{hint}")
    tensors = load_file(file)

    tree = as_param_tree(into)
    modules, leaves = plan(
        tree,
        module_names,
        rules,
        (theirs.rank, f"'{os.path.join(directory, CONFIG_NAME)}' has r ="),
        where,
    )
    missing: list[str] = []
    parts: dict[str, dict[tuple[int, ...], Any]] = {}
    for m in modules:
        for role, path in (("A", m.pair.a_path), ("B", m.pair.b_path)):
            key = f"{_KEY_PREFIX}{m.name}.lora_{role}.weight"
            if key not in tensors:
                missing.append(key)
                continue
            leaf = leaves[path]
            value = tensors[key]
            if m.pair.layout == "flax":
                value = _swap(value)
            want = tuple(np.shape(leaf))[len(m.index) :]
            if tuple(value.shape) != want:
                raise ValueError(
                    f"{where}: '{key}' has shape {tuple(tensors[key].shape)}, but '{path}'"
                    f"{list(m.index) if m.index else ''} has {want} (PyTorch layout "
                    f"{tuple(reversed(want)) if m.pair.layout == 'flax' else want})."
                )
            parts.setdefault(path, {})[m.index] = value.astype(jnp.result_type(leaf))
    used = {f"{_KEY_PREFIX}{m.name}.lora_{r}.weight" for m in modules for r in "AB"}
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected:
        raise ValueError(
            f"{where}: '{file}' does not fit the parameters. Keys the parameters need but the "
            f"file lacks: {sorted(missing)}; keys in the file with no LoRA pair in the "
            f"parameters: {unexpected}. Check module_names: the parameters' LoRA modules map "
            f"to {preview(sorted({m.name for m in modules}))}."
        )
    adapter = {}
    for path, by_index in parts.items():
        shape = np.shape(leaves[path])
        if () in by_index:
            adapter[path] = by_index[()]
        else:
            stack_shape = shape[: len(shape) - 2]
            flat = [by_index[tuple(int(j) for j in i)] for i in np.ndindex(*stack_shape)]
            adapter[path] = jnp.stack(flat).reshape(shape)
    # The pairs the plan found, not found again.
    factors = {path for m in modules for path in (m.pair.a_path, m.pair.b_path)}
    return _replace_factors(tree, adapter, factors)
