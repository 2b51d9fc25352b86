"""Finding LoRA factor pairs in a parameter pytree, by path: the one rule, in one place.

Every leaf path becomes a tuple of string *tokens* (dict keys, attribute names, sequence indices;
string keys also split on ``.`` and ``/``; an ``nnx.Variable``'s trailing ``value`` dropped).
Each [`PairingRule`][rplora_jax.pairing.PairingRule], in order, says whether a leaf is the ``a``
or the ``b`` factor of some pair, and under which group key; leaves with equal (rule, group key)
form one pair. [`DEFAULT_RULES`][rplora_jax.pairing.DEFAULT_RULES] find ``.../lora_a`` and
``.../lora_b`` (Flax NNX, this library's layers), qwix's ``.../<w>_lora_a`` and gemma's
``.../lora/a``, all in *Flax layout*; [`PEFT`][rplora_jax.pairing.PEFT] finds ``lora_A`` /
``lora_B`` in *PyTorch layout*::

    Flax:     a: (*stack, *in_axes, r)      b: (*stack, r, *out_axes)
    PyTorch:  A: (*stack, r, *in_axes)      B: (*stack, *out_axes, r)

``*stack`` are leading axes shared by both factors: independent stacked layers (``nn.scan``,
``nnx.vmap``). Unless ``stacked_axes`` is given, their number is the largest ``k`` for which both
factors share their first ``k`` axes and the partner factor has the rank ``r`` at axis ``k``
while each factor keeps a feature axis; where two readings fit, the base kernel next to the
factors decides, and without it the stacked reading is taken. The Grams contract every axis that
is neither stacked nor the rank, so einsum LoRA with several feature axes works as is. The
``docs/pairing.md`` has the details.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rplora_jax._trees import QWIX_FACTOR, find_kernel, is_masked, path_str, path_tokens

Layout = Literal["flax", "torch"]
"""How a pair's factors are laid out: ``"flax"`` (``a: (in, r)``, ``b: (r, out)``) or ``"torch"``
(``A: (r, in)``, ``B: (out, r)``)."""
MatchFn = Callable[[tuple[str, ...]], tuple[Literal["a", "b"], Hashable] | None]
"""A rule's match function: a leaf's path tokens to ``("a" | "b", group_key)`` or ``None``."""


@dataclasses.dataclass(frozen=True)
class PairingRule:
    """Says which leaves are LoRA factors and how they are laid out.

    Attributes:
      match: maps a leaf's path tokens to ``("a" | "b", group_key)``, or ``None`` for a leaf
        that is not a factor of this rule. The two factors of one pair share their group key.
      layout: ``"flax"`` (``a: (..., in, r)``, ``b: (..., r, out)``) or ``"torch"``
        (``A: (..., r, in)``, ``B: (..., out, r)``).
      name: shown in error messages and in [`LoRAPair`][rplora_jax.pairing.LoRAPair].
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
      A [`PairingRule`][rplora_jax.pairing.PairingRule].
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


def _match_qwix(tokens):
    found = QWIX_FACTOR.match(tokens[-1]) if tokens else None
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
(``lora/lora_a``) and this library's layers. In [`DEFAULT_RULES`][rplora_jax.pairing.DEFAULT_RULES].
"""
QWIX: PairingRule = PairingRule(_match_qwix, "flax", "<w>_lora_a/<w>_lora_b")
"""Siblings ``.../<w>_lora_a``, ``.../<w>_lora_b`` next to a weight ``<w>`` (qwix; Flax layout).
In [`DEFAULT_RULES`][rplora_jax.pairing.DEFAULT_RULES]."""
GEMMA: PairingRule = PairingRule(_match_gemma, "flax", "lora/a, lora/b")
"""``.../lora/a``, ``.../lora/b`` (gemma's ``peft`` layers; Flax layout). In
[`DEFAULT_RULES`][rplora_jax.pairing.DEFAULT_RULES]."""
PEFT: PairingRule = dataclasses.replace(
    names("lora_A", "lora_B", layout="torch"), name="lora_A/lora_B (torch layout)"
)
"""Tokens ``lora_A``, ``lora_B`` anywhere in the path, PyTorch layout ``A: (r, in)``,
``B: (out, r)``: PEFT checkpoints, Levanter. Not a default: pass ``rules=``."""
LORAX: PairingRule = PairingRule(_match_lorax, "flax", "lorax LoraWeight b/a")
"""lorax's ``LoraWeight`` fields ``.../a``, ``.../b``, whose names are swapped with respect to
this library's (lorax's ``b: (in, r)`` is our ``a``). Not a default: pass ``rules=``."""
DEFAULT_RULES: tuple[PairingRule, ...] = (NNX, QWIX, GEMMA)
"""The rules used when ``rules=None``: [`NNX`][rplora_jax.pairing.NNX],
[`QWIX`][rplora_jax.pairing.QWIX], [`GEMMA`][rplora_jax.pairing.GEMMA], in that order."""

RuleSpec = PairingRule | tuple[str, str] | MatchFn
"""What ``rules=`` takes, alone or in a sequence: a
[`PairingRule`][rplora_jax.pairing.PairingRule], an ``(a_name, b_name)`` tuple (see
[`names`][rplora_jax.pairing.names]) or a bare [`MatchFn`][rplora_jax.pairing.MatchFn] (Flax
layout)."""


def _is_name_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(n, str) for n in x)


def _as_rules(rules: RuleSpec | Sequence[RuleSpec] | None) -> tuple[PairingRule, ...]:
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


_ALLOW_NO_PAIRS_HINT = ", or allow_no_pairs=True if a tree without LoRA factors is intended"


def _no_pairs_error(tree: Any, where: str, hint: str = _ALLOW_NO_PAIRS_HINT) -> ValueError:
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
    if kernel is not None and not is_masked(leaves[index[kernel]]):
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


def _match_pairs(
    tree: Any,
    *,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
) -> tuple[list[_Pair], list[Any], Any]:
    """Finds the pairs of ``tree``; returns them with the flat leaves and the treedef.

    ``optax.MaskedNode`` leaves are kept (so a pair split by a partition is reported); a pair whose
    factors are both masked belongs to another branch and is skipped.
    """
    rules = _as_rules(rules)
    _check_stacked_axes(stacked_axes)
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)
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
        masked = {role: is_masked(leaves[i]) for role, i in slot.items()}
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
    """Lists the LoRA pairs that
    [`riemannian_preconditioner`][rplora_jax.preconditioner.riemannian_preconditioner] will
    precondition.

    Args:
      params: a parameter pytree (dicts, Flax variables, ``nnx.State``, dataclasses...).
      rules: how factors are named; ``None`` for
        [`DEFAULT_RULES`][rplora_jax.pairing.DEFAULT_RULES]. Also accepts a
        [`PairingRule`][rplora_jax.pairing.PairingRule], an ``(a_name, b_name)`` tuple, a callable
        ``tokens -> (role, group_key) | None``, or a sequence of those.
      stacked_axes: number of leading stacked-layer axes; ``None`` infers it per pair.

    Returns:
      A list of [`LoRAPair`][rplora_jax.pairing.LoRAPair], in tree order.

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
    pairs, _, _ = _match_pairs(params, rules=rules, stacked_axes=stacked_axes)
    return [p.info for p in pairs]


def _factor_paths(tree: Any, *, rules: RuleSpec | Sequence[RuleSpec] | None = None) -> set[str]:
    """Paths of every LoRA factor (``a`` and ``b``) the pairing finds in ``tree``."""
    pairs = find_lora_pairs(tree, rules=rules)
    return {p.a_path for p in pairs} | {p.b_path for p in pairs}
