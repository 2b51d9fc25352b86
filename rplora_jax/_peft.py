"""What a PEFT adapter directory holds: module names, and a checked ``adapter_config.json``.

Each pair (each layer of a stacked pair) is one PEFT module, named by ``module_names``. PEFT's
``LoraConfig`` has grown many options; an adapter that uses one this library's LoRA lacks would
load as another model, so each field is harmless, restricted to the values this library loads
exactly, or unknown and then must hold PEFT's "off" value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from rplora_jax._trees import path_str
from rplora_jax.pairing import LoRAPair, find_lora_pairs

if TYPE_CHECKING:
    from rplora_jax.layers.config import LoRAConfig

CONFIG_NAME = "adapter_config.json"

ModuleNames = Mapping[str, str] | Callable[..., str] | None


def default_module_name(path: str) -> str:
    """The default PyTorch module name of a Flax module path: drop ``params``, join with ``.``.

    A leading ``base_model/model`` (PEFT's own prefix, in a tree read from a PEFT file) is
    dropped too, since the adapter file adds it to every name.

    Args:
      path: the ``/``-joined module path, e.g. ``"params/encoder/layer_0/query"``.

    Returns:
      The dotted name, e.g. ``"encoder.layer_0.query"``.

    Examples:
      >>> default_module_name("params/encoder/layer_0/query")
      'encoder.layer_0.query'
      >>> import re  # Flax's "layer_0" is PyTorch's "layers.0":
      >>> re.sub(r"layer_(\\d+)", r"layers.\\1", default_module_name("params/layer_3/attn/query"))
      'layers.3.attn.query'
      >>> default_module_name("base_model/model/fc1")
      'fc1'
    """
    tokens = [t for t in path.split("/") if t]
    if tokens and tokens[0] == "params":
        tokens = tokens[1:]
    if tokens[:2] == ["base_model", "model"]:  # a tree with PEFT's own names: not added twice
        tokens = tokens[2:]
    return ".".join(tokens)


# HuggingFace decoders (Llama, Mistral, Qwen, Gemma...): model.layers.{i}.<group>.<projection>.
_HF_GROUPS = {
    **dict.fromkeys(("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
    **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), "mlp"),
}
_LAYER = re.compile(r"(?:^|/)layers?[_/](\d+)(?:/|$)")


def hf_decoder_names(prefix: str = "model.") -> Callable[..., str]:
    """A ``module_names`` callable for HuggingFace decoders: a pair whose module path ends in a
    projection name (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``,
    ``up_proj``, ``down_proj``) in layer ``i`` is ``{prefix}layers.{i}.self_attn.q_proj`` (or
    ``.mlp.gate_proj``...), the names of Llama, Mistral, Qwen and Gemma in transformers.

    The layer is the stacked index (``nn.scan`` / ``nnx.vmap`` layers) or a number in the path
    (``layers/3/...``, ``layers_3/...``). ``prefix`` is the decoder's attribute path in the
    task model (``"model."`` for ``LlamaForCausalLM``; ``""`` for the bare ``LlamaModel``).

    Examples:
      >>> names = hf_decoder_names()
      >>> names("params/layers/q_proj", (3,))
      'model.layers.3.self_attn.q_proj'
      >>> names("decoder/layers_0/mlp/down_proj")
      'model.layers.0.mlp.down_proj'
    """

    def name(path: str, index: tuple[int, ...] = ()) -> str:
        projection = path.rsplit("/", 1)[-1]
        if projection not in _HF_GROUPS:
            raise ValueError(
                f"hf_decoder_names: '{path}' does not end in a projection name "
                f"{sorted(_HF_GROUPS)}; pass module_names= of your own for it."
            )
        found = _LAYER.search(path)
        if index:
            layer = index[0]
        elif found is not None:
            layer = int(found.group(1))
        else:
            raise ValueError(
                f"hf_decoder_names: no layer number in '{path}' (stacked index or "
                "layers/<i>/, layers_<i>/)."
            )
        return f"{prefix}layers.{layer}.{_HF_GROUPS[projection]}.{projection}"

    return name


def check_module_names(modules: list[Module], known: Iterable[str], where: str) -> None:
    """Every module's name must be one of ``known`` (a PyTorch model's ``named_modules()``)."""
    known = set(known)
    missing = sorted({m.name for m in modules} - known)
    if not missing:
        return
    hints = [p for p in ("model.", "base_model.model.") if all(p + n in known for n in missing)]
    hint = f" They are there with the prefix {hints[0]!r}." if hints else ""
    raise ValueError(
        f"{where}: the adapter names modules the PyTorch model does not have: "
        f"{preview(missing)}.{hint} PEFT would load such an adapter with a warning and serve "
        "the base model unchanged."
    )


def preview(names: list[str], n: int = 8) -> str:
    """The first ``n`` names, and how many more there are."""
    return str(names) if len(names) <= n else f"{names[:n]} and {len(names) - n} more"


class Module(NamedTuple):
    """One PEFT module: a pair, or one layer of a stacked pair."""

    name: str
    path: str
    index: tuple[int, ...]
    pair: LoRAPair


def _module_path(pair: LoRAPair) -> str:
    """The module holding a pair: the common prefix of its factors' paths, minus a ``lora``."""
    a, b = pair.a_path.split("/"), pair.b_path.split("/")
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    tokens = a[:n]
    if tokens and tokens[-1] == "lora":  # nnx.LoRALinear's `lora` submodule, gemma's `lora/a`
        tokens = tokens[:-1]
    return "/".join(tokens)


def _torch_name(
    module_names: ModuleNames, path: str, index: tuple[int, ...], pair: LoRAPair, where: str
) -> str:
    if index:
        if module_names is None or isinstance(module_names, Mapping):
            raise ValueError(
                f"{where}: the pair at '{path}' is stacked: {pair.stacked_shape} layers "
                "(nn.scan / nnx.vmap); PEFT stores one module per layer. Pass "
                "module_names=callable(path, index) -> torch name, e.g. "
                "lambda path, i: f'layers.{i[0]}.attn.query'."
            )
        name = module_names(path, index)
    elif module_names is None:
        name = default_module_name(path)
    elif isinstance(module_names, Mapping):
        short = path[len("params/") :] if path.startswith("params/") else path
        name = module_names.get(path, module_names.get(short))
        if name is None:
            raise ValueError(
                f"{where}: module_names has no entry for the LoRA module '{path}' (keys are "
                f"Flax module paths such as {path!r} or {short!r}); it has "
                f"{sorted(module_names)}."
            )
    else:
        name = module_names(path)
    if not isinstance(name, str) or not name or name.startswith(".") or name.endswith("."):
        raise ValueError(
            f"{where}: module_names gave {name!r} for '{path}'{f' {index}' if index else ''}; "
            "expected a dotted PyTorch module name such as 'encoder.layer.0.attention.query'."
        )
    return name


def plan(
    tree: Any, module_names: ModuleNames, rules, rank: tuple[int, str] | None, where: str
) -> tuple[list[Module], dict[str, Any]]:
    """The PEFT modules of ``tree``'s pairs, and ``tree``'s leaves by path; ``rank``: the rank
    every pair must have, and where it comes from."""
    pairs = find_lora_pairs(tree, rules=rules)
    if not pairs:
        raise ValueError(f"{where}: no LoRA factors found in the parameters.")
    leaves = {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    modules: list[Module] = []
    for pair in pairs:
        a_shape, b_shape = np.shape(leaves[pair.a_path]), np.shape(leaves[pair.b_path])
        n_stack = len(pair.stacked_shape)
        if len(a_shape) - n_stack != 2 or len(b_shape) - n_stack != 2:
            raise ValueError(
                f"{where}: the pair '{pair.a_path}' {tuple(a_shape)} / '{pair.b_path}' "
                f"{tuple(b_shape)} has several input or output axes (DenseGeneral / Einsum "
                "LoRA); PEFT's LoRA wraps a torch.nn.Linear, A: (r, in) and B: (out, r), so it "
                "has no PEFT equivalent. Use LoRA on 2-D kernels (nn.Dense / nnx.Linear) for "
                "adapters PEFT should load."
            )
        if rank is not None and pair.rank != rank[0]:
            raise ValueError(
                f"{where}: the pair at '{pair.a_path}' has rank {pair.rank} but {rank[1]} "
                f"{rank[0]}; a PEFT adapter has one rank r."
            )
        path = _module_path(pair)
        for index in np.ndindex(*pair.stacked_shape) if n_stack else [()]:
            index = tuple(int(i) for i in index)
            name = _torch_name(module_names, path, index, pair, where)
            modules.append(Module(name, path, index, pair))
    seen: dict[str, Module] = {}
    for m in modules:
        if m.name in seen:
            other = seen[m.name]
            raise ValueError(
                f"{where}: '{m.path}'{m.index or ''} and '{other.path}'{other.index or ''} both "
                f"map to the PyTorch module '{m.name}'; module_names must give distinct names."
            )
        seen[m.name] = m
    return modules, leaves


# PEFT LoraConfig fields that do not change what a loaded adapter computes: bookkeeping, which
# modules get LoRA, dropout, data for initialisations (checked through init_lora_weights), a
# backward-only variant (VeLoRA), tying the adapters of tied layers (each module's factors are
# still in the file, and a missing one is an error), and the base weight's layout
# (fan_in_fan_out: GPT-2's Conv1D
# stores W0 as (in, out), a Flax kernel's layout; its lora_A / lora_B are ordinary (r, in) /
# (out, r) factors).
_ANY_VALUE = frozenset({
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "lora_alpha", "use_rslora", "lora_dropout",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "runtime_config", "velora_config",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying",
})  # fmt: skip
# (field, values this library loads exactly, what another value means)
_RESTRICTED = (
    ("use_dora", (False, None), "DoRA's magnitude vectors"),
    ("bias", ("none", None), "trained biases"),
    ("lora_bias", (False, None), "a bias on lora_B"),
    ("rank_pattern", ({}, None), "per-module ranks"),
    ("alpha_pattern", ({}, None), "per-module alphas"),
    ("modules_to_save", (None, []), "fully trained extra modules"),
    ("layer_replication", (None, []), "replicated layers"),
    ("target_parameters", (None, []), "LoRA on nn.Parameters"),
    (
        "init_lora_weights",
        (True, False, None, "gaussian", "eva", "orthogonal"),
        "an initialisation that PEFT runs again when it loads the adapter and that changes the "
        "base weight (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ) or the layer (MiCA); convert the "
        "adapter to plain LoRA in PEFT first (save_pretrained(..., "
        "path_initial_model_for_weight_conversion=...))",
    ),
)
# Any other field must hold one of these (PEFT's defaults for "off"): a field this library does
# not know (aLoRA's alora_invocation_tokens, KaSA, QALoRA, a later PEFT's options) may change
# the model.
_OFF = (None, False, {}, [], "", "none")


def _check_fields(cfg: Mapping[str, Any], file: str, where: str) -> None:
    restricted = {field: (allowed, meaning) for field, allowed, meaning in _RESTRICTED}
    for field, value in cfg.items():
        if field in _ANY_VALUE:
            continue
        if field in restricted:
            allowed, meaning = restricted[field]
            if value not in allowed:
                raise ValueError(
                    f"{where}: '{file}' has {field}={value!r} ({meaning}), which this "
                    f"library's LoRA does not have; supported: {field}={allowed[0]!r}."
                )
        elif not any(value == off and type(value) is type(off) for off in _OFF):
            raise ValueError(
                f"{where}: '{file}' has {field}={value!r}, a PEFT option this library does not "
                "know and so cannot load exactly; it loads plain LoRA adapters (this field "
                f"unset: one of {list(_OFF)})."
            )


def read_config(directory: str | os.PathLike, where: str) -> dict[str, Any]:
    file = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{where}: no {CONFIG_NAME} in '{directory}'.")
    with open(file) as f:
        cfg = json.load(f)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"{where}: '{file}' has peft_type={cfg.get('peft_type')!r}; only LoRA ('LORA') "
            "adapters can be loaded."
        )
    _check_fields(cfg, file, where)
    for field in ("r", "lora_alpha"):
        if not isinstance(cfg.get(field), (int, float)) or isinstance(cfg.get(field), bool):
            raise ValueError(f"{where}: '{file}' needs a number '{field}', got {cfg.get(field)!r}.")
    return cfg


def lora_config(cfg: Mapping[str, Any], where: str) -> LoRAConfig:
    """The [`LoRAConfig`][rplora_jax.layers.config.LoRAConfig] of a checked
    ``adapter_config.json``."""
    from rplora_jax.layers.config import LoRAConfig

    if not float(cfg["r"]).is_integer():
        raise ValueError(f"{where}: r must be an integer, got {cfg['r']!r}.")
    return LoRAConfig(
        rank=int(cfg["r"]),
        alpha=cfg["lora_alpha"],
        rslora=bool(cfg.get("use_rslora", False)),
        dropout_rate=float(cfg.get("lora_dropout") or 0.0),
    )
