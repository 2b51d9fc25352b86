"""Finding LoRA factor pairs in a parameter pytree, by path.

The one rule, in one place
--------------------------
Every leaf path is turned into a tuple of string *tokens*: dict keys, attribute names and sequence
indices, with string keys also split on ``.`` and ``/`` (so flat checkpoints such as
``{"layers.0.q_proj.lora_A.weight": ...}`` work), and a trailing ``value`` attribute of an
``nnx.Variable`` dropped. Each :class:`PairingRule`, in order, looks at the tokens and says whether
the leaf is the ``a`` or the ``b`` factor of some pair, and under which group key; leaves with equal
(rule, group key) form one pair. The default rules (:data:`DEFAULT_RULES`) find, with no
configuration:

* ``.../lora_a`` and ``.../lora_b`` siblings: Flax NNX ``nnx.LoRA``, ``nnx.LoRALinear`` (under its
  ``lora`` submodule) and this library's layers;
* ``.../<w>_lora_a`` and ``.../<w>_lora_b`` siblings: qwix;
* ``.../lora/a`` and ``.../lora/b``: gemma's ``peft`` layers.

All of these store factors in *Flax layout*, ``y = x @ (W0 + s * a @ b)``::

    a: (*stack, *in_axes, r)      b: (*stack, r, *out_axes)

:data:`PEFT` matches ``lora_A`` / ``lora_B`` path tokens (PEFT and PyTorch checkpoints, anywhere in
the path, e.g. ``q_proj/lora_A/weight``) in *PyTorch layout*, ``W = W0 + s * B @ A``::

    A: (*stack, r, *in_axes)      B: (*stack, *out_axes, r)

:data:`LORAX` matches lorax's ``LoraWeight`` fields, whose ``a``/``b`` names are swapped with
respect to ours. :func:`names` builds a rule from two leaf names, and :class:`PairingRule` wraps any
callable.

``*stack`` are leading axes shared by both factors: independent stacked layers (``nn.scan``,
``nnx.vmap``). Unless ``stacked_axes`` is given, their number is the largest ``k`` for which both
factors share their first ``k`` axes and the partner factor has the rank ``r`` at axis ``k`` while
each factor keeps at least one non-rank axis. Two readings can fit the same shapes: ``L`` stacked
layers of rank ``r = L`` (``a: (L, in, r)``, ``b: (L, r, out)``) also read as one layer with two
input and two output axes. Then the base kernel next to the factors, when the tree has it
(see :func:`find_kernel`), decides; without it the stacked reading is taken,
and ``stacked_axes=0`` gives the other. The Gram matrices contract every axis that is neither
stacked nor the rank axis, so einsum LoRA with several feature axes
(``a: (heads, head_dim, r)``, ``b: (r, d_model)``) works as is.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Layout = Literal["flax", "torch"]
Role = Literal["a", "b"]
MatchFn = Callable[[tuple[str, ...]], tuple[Role, Hashable] | None]


@dataclasses.dataclass(frozen=True)
class PairingRule:
    """Says which leaves are LoRA factors and how they are laid out.

    Attributes:
      match: maps a leaf's path tokens to ``("a" | "b", group_key)``, or ``None`` for a leaf
        that is not a factor of this rule. The two factors of one pair share their group key.
      layout: ``"flax"`` (``a: (..., in, r)``, ``b: (..., r, out)``) or ``"torch"``
        (``A: (..., r, in)``, ``B: (..., out, r)``).
      name: shown in error messages and in :class:`LoRAPair`.
    """

    match: MatchFn
    layout: Layout = "flax"
    name: str = "custom"

    def __post_init__(self):
        if self.layout not in ("flax", "torch"):
            raise ValueError(f"PairingRule.layout must be 'flax' or 'torch', got {self.layout!r}.")


class LoRAPair(NamedTuple):
    """One pair of LoRA factors found in a parameter tree.

    Attributes:
      a_path: path of the input-side factor (``a`` in Flax layout, ``A`` in PyTorch layout).
      b_path: path of the output-side factor.
      layout: ``"flax"`` or ``"torch"``.
      rank: the LoRA rank ``r``.
      stacked_shape: shape of the leading axes shared as independent stacked layers.
      rule: name of the rule that matched.
    """

    a_path: str
    b_path: str
    layout: Layout
    rank: int
    stacked_shape: tuple[int, ...]
    rule: str


def names(a_name: str, b_name: str, *, layout: Layout = "flax") -> PairingRule:
    """A rule pairing the path tokens ``a_name`` and ``b_name`` (last occurrence in the path).

    The rest of the two paths must be equal, so ``("down", "up")`` pairs ``layer/down`` with
    ``layer/up`` and ``layer/down/weight`` with ``layer/up/weight``.

    Args:
      a_name: token naming the input-side factor.
      b_name: token naming the output-side factor.
      layout: storage layout of both factors.

    Returns:
      A :class:`PairingRule`.
    """
    if a_name == b_name:
        raise ValueError(f"names() needs two different names, got {a_name!r} twice.")
    roles = {a_name: "a", b_name: "b"}

    def match(tokens):
        for i in range(len(tokens) - 1, -1, -1):
            role = roles.get(tokens[i])
            if role is not None:
                return role, (*tokens[:i], "*", *tokens[i + 1 :])
        return None

    return PairingRule(match, layout, f"names({a_name!r}, {b_name!r})")


_QWIX = re.compile(r"^(.+)_lora_([ab])$")


def _match_qwix(tokens):
    found = _QWIX.match(tokens[-1]) if tokens else None
    if found is None:
        return None
    return found.group(2), (*tokens[:-1], found.group(1))


def _match_gemma(tokens):
    if len(tokens) >= 2 and tokens[-2] == "lora" and tokens[-1] in ("a", "b"):
        return tokens[-1], tokens[:-1]
    return None


def _match_lorax(tokens):
    # lorax's LoraWeight is w + alpha/r * b @ a, b: (in, r), a: (r, out): its "b" is our "a".
    if len(tokens) >= 2 and tokens[-1] in ("a", "b") and tokens[-2] != "lora":
        return ("a" if tokens[-1] == "b" else "b"), tokens[:-1]
    return None


NNX: PairingRule = dataclasses.replace(names("lora_a", "lora_b"), name="lora_a/lora_b")
"""Siblings ``.../lora_a``, ``.../lora_b`` (Flax layout): ``nnx.LoRA``, ``nnx.LoRALinear``
(``lora/lora_a``) and this library's layers. In :data:`DEFAULT_RULES`."""
QWIX: PairingRule = PairingRule(_match_qwix, "flax", "<w>_lora_a/<w>_lora_b")
"""Siblings ``.../<w>_lora_a``, ``.../<w>_lora_b`` next to a weight ``<w>`` (qwix; Flax layout).
In :data:`DEFAULT_RULES`."""
GEMMA: PairingRule = PairingRule(_match_gemma, "flax", "lora/a, lora/b")
"""``.../lora/a``, ``.../lora/b`` (gemma's ``peft`` layers; Flax layout). In
:data:`DEFAULT_RULES`."""
PEFT: PairingRule = dataclasses.replace(
    names("lora_A", "lora_B", layout="torch"), name="lora_A/lora_B (torch layout)"
)
"""Tokens ``lora_A``, ``lora_B`` anywhere in the path, PyTorch layout ``A: (r, in)``,
``B: (out, r)``: PEFT checkpoints, Levanter. Not a default: pass ``rules=``."""
LORAX: PairingRule = PairingRule(_match_lorax, "flax", "lorax LoraWeight b/a")
"""lorax's ``LoraWeight`` fields ``.../a``, ``.../b``, whose names are swapped with respect to
this library's (lorax's ``b: (in, r)`` is our ``a``). Not a default: pass ``rules=``."""
DEFAULT_RULES: tuple[PairingRule, ...] = (NNX, QWIX, GEMMA)
"""The rules used when ``rules=None``: :data:`NNX`, :data:`QWIX`, :data:`GEMMA`, in that order."""

RuleSpec = PairingRule | tuple[str, str] | MatchFn


def _is_name_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(n, str) for n in x)


def as_rules(rules: RuleSpec | Sequence[RuleSpec] | None) -> tuple[PairingRule, ...]:
    """Normalises the ``rules`` argument accepted across the library."""
    if rules is None:
        return DEFAULT_RULES
    if isinstance(rules, PairingRule) or callable(rules) or _is_name_pair(rules):
        rules = [rules]
    if isinstance(rules, str):  # iterated, a string would be read as one rule per character
        raise TypeError(
            f"rules={rules!r} is one name: give both factors' names, rules=({rules!r}, "
            "'<b name>'), or a PairingRule."
        )
    out = []
    for rule in rules:
        if isinstance(rule, PairingRule):
            out.append(rule)
        elif _is_name_pair(rule):
            out.append(names(*rule))
        elif callable(rule):
            out.append(PairingRule(rule, "flax", getattr(rule, "__name__", "custom")))
        else:
            raise TypeError(
                "rules must be a PairingRule, an (a_name, b_name) tuple, a callable "
                f"tokens -> (role, group) | None, or a sequence of those; got {rule!r}."
            )
    if not out:
        raise ValueError("rules is empty: give at least one PairingRule.")
    return tuple(out)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


_VALUE_ATTRS = ("value", "raw_value")


def path_tokens(path: tuple[Any, ...]) -> tuple[str, ...]:
    """Turns a JAX key path into the string tokens the rules see."""
    tokens: list[str] = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            # flax.traverse_util.flatten_dict's keys are tuples of names.
            parts = key.key if isinstance(key.key, tuple) else (key.key,)
            tokens.extend(t for part in parts for t in re.split(r"[./]", str(part)) if t)
        elif isinstance(key, jax.tree_util.GetAttrKey):
            tokens.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            tokens.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            tokens.append(str(key.key))
        else:
            tokens.append(str(key))
    # nnx.Variable leaves add a `.value` attribute that is not part of the module path.
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name in _VALUE_ATTRS:
        tokens.pop()
    return tuple(tokens)


def path_str(keypath: tuple[Any, ...]) -> str:
    """The ``/``-joined path tokens of a JAX key path, as the pairing and errors name leaves."""
    return "/".join(path_tokens(keypath))


ALLOW_NO_PAIRS_HINT = ", or allow_no_pairs=True if a tree without LoRA factors is intended"


def no_pairs_error(tree: Any, where: str, hint: str = ALLOW_NO_PAIRS_HINT) -> ValueError:
    """The error for a tree in which ``where`` found no LoRA pair, showing its first paths;
    ``hint`` ends the advice (by default: ``where`` takes ``allow_no_pairs``)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = [path_str(p) for p, _ in flat[:4]]
    return ValueError(
        f"{where} found no LoRA pairs among {len(flat)} leaves (first paths: {paths}). This "
        "almost always means the factor names do not match the pairing rules: pass rules= (see "
        f"rplora_jax.pairing){hint}."
    )


class _Pair(NamedTuple):
    """A pair as the preconditioner uses it: leaf indices plus static geometry."""

    a_index: int
    b_index: int
    a_rank_axis: int
    b_rank_axis: int
    stacked: int
    info: LoRAPair


def _check_factor(path: str, role: str, leaf: Any) -> None:
    shape = np.shape(leaf)
    dtype = jnp.result_type(leaf)
    if len(shape) < 2:
        raise ValueError(
            f"LoRA factor {role!r} at '{path}' must have at least 2 axes (features and rank), "
            f"got shape {shape}."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"LoRA factor {role!r} at '{path}' must have a floating dtype, got {dtype}."
        )
    if 0 in shape:
        raise ValueError(f"LoRA factor {role!r} at '{path}' is empty: shape {shape}.")


# Names under which base weights are stored next to (or above) their LoRA factors: Flax and this
# library's layers, gemma's "w", PyTorch/PEFT's "weight", embeddings.
KERNEL_NAMES: tuple[str, ...] = ("kernel", "w", "weight", "embedding")
_SEARCH_DEPTH = 3


def find_kernel(a_path: str, b_path: str, paths: Collection[str]) -> str | None:
    """The path of the base kernel of the pair ``a_path`` / ``b_path`` among ``paths``.

    Looks for a qwix ``<w>`` sibling of ``<w>_lora_a``, then, from the factor's parent upwards (3
    levels), for a leaf named one of :data:`KERNEL_NAMES` or ``base_layer/weight`` (PEFT).
    """
    tokens = tuple(a_path.split("/"))
    found = _QWIX.match(tokens[-1])
    if found is not None:
        candidate = "/".join((*tokens[:-1], found.group(1)))
        if candidate in paths:
            return candidate
    for depth in range(1, _SEARCH_DEPTH + 1):
        prefix = tokens[:-depth]
        for name in (*((n,) for n in KERNEL_NAMES), ("base_layer", "weight")):
            candidate = "/".join((*prefix, *name))
            if candidate in paths and candidate not in (a_path, b_path):
                return candidate
    return None


def _check_match(found: Any, rule: PairingRule, path: str) -> None:
    ok = isinstance(found, tuple) and len(found) == 2 and found[0] in ("a", "b")
    if ok:
        try:
            hash(found[1])
        except TypeError:
            ok = False
    if not ok:
        raise ValueError(
            f"Rule {rule.name} returned {found!r} for '{path}'; a rule returns None or "
            "(role, group): role 'a' or 'b', and a hashable group shared by the two factors of "
            "a pair (e.g. a tuple of path tokens)."
        )


def _stacked_count(
    a_shape, b_shape, layout: Layout, stacked_axes: int | None, paths, kernel_shape=None
) -> int:
    """Number of leading stacked axes; see the module docstring for the rule. ``kernel_shape``,
    the base kernel's shape where known (Flax layout), settles a shape both readings fit."""
    # The partner of the factor that shows r as its last axis must have r right after the stack.
    rank, partner = (a_shape[-1], b_shape) if layout == "flax" else (b_shape[-1], a_shape)
    limit = min(len(a_shape), len(b_shape)) - 1
    valid = [k for k in range(limit) if a_shape[:k] == b_shape[:k] and partner[k] == rank]
    a_path, b_path = paths
    if stacked_axes is not None:
        if stacked_axes not in valid:
            raise ValueError(
                f"stacked_axes={stacked_axes} does not fit the pair a='{a_path}' {a_shape}, "
                f"b='{b_path}' {b_shape} ({layout} layout); valid values here: {valid}."
            )
        return stacked_axes
    if not valid:
        expected = (
            f"a: (*stack, *in, r) and b: (*stack, r, *out) with r = a.shape[-1] = {rank}"
            if layout == "flax"
            else f"A: (*stack, r, *in) and B: (*stack, *out, r) with r = B.shape[-1] = {rank}"
        )
        raise ValueError(
            f"LoRA rank mismatch between a='{a_path}' {a_shape} and b='{b_path}' {b_shape}: "
            f"expected {expected}."
        )
    if len(valid) > 1 and kernel_shape is not None:
        # Flax kernel (*stack, *in, *out); PyTorch weight (*stack, *out, *in).
        kernel_of = lambda k: (
            a_shape[:-1] + b_shape[k + 1 :] if layout == "flax" else b_shape[:-1] + a_shape[k + 1 :]
        )
        fits = [k for k in valid if tuple(kernel_shape) == kernel_of(k)]
        if len(fits) == 1:
            return fits[0]
    return max(valid)


def _build_pair(
    a_idx, b_idx, leaves, paths, rule: PairingRule, stacked_axes, index: dict[str, int]
) -> _Pair:
    a, b = leaves[a_idx], leaves[b_idx]
    a_path, b_path = paths[a_idx], paths[b_idx]
    _check_factor(a_path, "a", a)
    _check_factor(b_path, "b", b)
    a_shape, b_shape = tuple(np.shape(a)), tuple(np.shape(b))
    kernel = find_kernel(a_path, b_path, index)
    kernel_shape = None
    if kernel is not None and not _is_masked(leaves[index[kernel]]):
        kernel_shape = np.shape(leaves[index[kernel]])
    k = _stacked_count(a_shape, b_shape, rule.layout, stacked_axes, (a_path, b_path), kernel_shape)
    if rule.layout == "flax":
        a_rank_axis, b_rank_axis, rank = len(a_shape) - 1, k, a_shape[-1]
    else:
        a_rank_axis, b_rank_axis, rank = k, len(b_shape) - 1, b_shape[-1]
    a_features = math.prod(np.delete(a_shape[k:], a_rank_axis - k))
    b_features = math.prod(np.delete(b_shape[k:], b_rank_axis - k))
    if rank > max(a_features, b_features):
        # Never a useful LoRA; what a factor in the other layout looks like on a square layer.
        warnings.warn(
            f"The LoRA pair a='{a_path}' {a_shape}, b='{b_path}' {b_shape} reads as rank {rank}, "
            f"more than its {a_features} input and {b_features} output features (rule "
            f"{rule.name}, {rule.layout} layout): are the factors in the other layout? PyTorch "
            "layout is A: (r, in), B: (out, r); Flax layout a: (in, r), b: (r, out).",
            stacklevel=2,
        )
    info = LoRAPair(a_path, b_path, rule.layout, int(rank), a_shape[:k], rule.name)
    return _Pair(a_idx, b_idx, a_rank_axis, b_rank_axis, k, info)


def _missing_partner_error(path: str, role: str, rule: PairingRule, masked: str | None):
    other = "b" if role == "a" else "a"
    if masked is not None:
        return ValueError(
            f"LoRA factor {role!r} at '{path}' arrived without its {other!r} factor, which is "
            f"masked at '{masked}' (optax.MaskedNode): the two factors of a pair were split "
            "across optax.partition / multi_transform branches (or optax.masked). Label both "
            "factors of each pair alike."
        )
    return ValueError(
        f"LoRA factor {role!r} at '{path}' (rule {rule.name}) has no matching {other!r} factor. "
        "Check the factor names, or pass rules= to say how your factors are named."
    )


def _check_stacked_axes(stacked_axes) -> None:
    # optax.inject_hyperparams turns numeric arguments into arrays unless told they are static.
    if stacked_axes is not None and (
        isinstance(stacked_axes, bool) or not isinstance(stacked_axes, (int, np.integer))
    ):
        raise TypeError(
            f"stacked_axes must be an int or None, got {type(stacked_axes).__name__}; under "
            "optax.inject_hyperparams, pass static_args=('stacked_axes',)."
        )


def match_pairs(
    tree: Any,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
) -> tuple[list[_Pair], list[Any], Any]:
    """Finds the pairs of ``tree``; returns them with the flat leaves and the treedef.

    ``optax.MaskedNode`` leaves are kept (so a pair split by a partition is reported); a pair whose
    factors are both masked belongs to another branch and is skipped.
    """
    rules = as_rules(rules)
    _check_stacked_axes(stacked_axes)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_masked)
    leaves = [leaf for _, leaf in flat]
    tokens = [path_tokens(p) for p, _ in flat]
    paths = ["/".join(t) for t in tokens]
    groups: dict[tuple[int, Hashable], dict[str, int]] = {}
    for i, toks in enumerate(tokens):
        for r_idx, rule in enumerate(rules):
            found = rule.match(toks)
            if found is None:
                continue
            _check_match(found, rule, paths[i])
            role, group = found
            slot = groups.setdefault((r_idx, group), {})
            if role in slot:
                raise ValueError(
                    f"Two leaves claim to be factor {role!r} of the same LoRA pair: "
                    f"'{paths[slot[role]]}' and '{paths[i]}' (rule {rule.name})."
                )
            slot[role] = i
            break
    pairs = []
    index = {path: i for i, path in enumerate(paths)}
    for (r_idx, _), slot in groups.items():
        rule = rules[r_idx]
        masked = {role: _is_masked(leaves[i]) for role, i in slot.items()}
        if all(masked.values()):
            continue
        if len(slot) == 1 or any(masked.values()):
            role = next(r for r, m in masked.items() if not m)
            other = "b" if role == "a" else "a"
            masked_path = paths[slot[other]] if other in slot else None
            raise _missing_partner_error(paths[slot[role]], role, rule, masked_path)
        pairs.append(_build_pair(slot["a"], slot["b"], leaves, paths, rule, stacked_axes, index))
    pairs.sort(key=lambda p: p.a_index)
    return pairs, leaves, treedef


def find_lora_pairs(
    params: Any,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
) -> list[LoRAPair]:
    """Lists the LoRA pairs that :func:`riemannian_preconditioner` will precondition.

    Args:
      params: a parameter pytree (dicts, Flax variables, ``nnx.State``, dataclasses...).
      rules: how factors are named; ``None`` for :data:`DEFAULT_RULES`. Also accepts a
        :class:`PairingRule`, an ``(a_name, b_name)`` tuple, a callable
        ``tokens -> (role, group_key) | None``, or a sequence of those.
      stacked_axes: number of leading stacked-layer axes; ``None`` infers it per pair.

    Returns:
      A list of :class:`LoRAPair`, in tree order.

    Raises:
      ValueError: naming the leaf path, for a factor without its partner, mismatched ranks,
        factors with fewer than 2 axes or a non-floating dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> import rplora_jax
      >>> params = {"q": {"kernel": jnp.zeros((8, 8)),
      ...                 "lora_a": jnp.zeros((8, 2)), "lora_b": jnp.zeros((2, 8))}}
      >>> [(p.a_path, p.b_path, p.rank) for p in rplora_jax.find_lora_pairs(params)]
      [('q/lora_a', 'q/lora_b', 2)]
    """
    pairs, _, _ = match_pairs(params, rules=rules, stacked_axes=stacked_axes)
    return [p.info for p in pairs]
