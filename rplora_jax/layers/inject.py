"""Add LoRA to an existing Flax model without editing its code.

Target layers are chosen by a regular expression on their module path, which must match the
*whole* path (``re.fullmatch``, like PEFT's regex ``target_modules``); a sequence of expressions
matches a path if any one does. Paths are ``/``-joined module names, e.g.
``"blocks_0/attn/query"`` in linen or ``"blocks/0/attn/query"`` in NNX.

* Linen ([`inject_linen`][rplora_jax.layers.inject.inject_linen]): the model's ``__call__`` runs
  under ``nn.intercept_methods``; every matching ``nn.Dense`` / ``nn.DenseGeneral`` /
  ``nn.Einsum`` call gets ``s * x @ a @ b`` added and ``lora_a``/``lora_b`` created next to its
  ``kernel``. The model's code and parameter names are untouched, so pretrained variables load
  as they are (``LinenLoRA.init_from``).
* NNX ([`inject_nnx`][rplora_jax.layers.inject.inject_nnx]): matching ``nnx.Linear`` /
  ``nnx.LinearGeneral`` / ``nnx.Einsum`` submodules are replaced in place by the layers of
  ``rplora_jax.layers.lora_nnx``, sharing the original ``kernel``/``bias`` variables.

``b`` starts at zero, so the injected model's outputs equal the original's exactly at
initialisation. A pattern that matches no layer, a match that is not a linear layer, and a layer
that already has LoRA are each a ``ValueError`` naming the paths.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import numpy as np
from flax import linen as nn
from flax import nnx, traverse_util

from rplora_jax.layers import lora_nnx
from rplora_jax.layers.config import LoRAConfig, _check_lora
from rplora_jax.layers.lora_linen import _LINEN_LINEAR, _LINEN_LORA, _lora_delta

# Modules that already carry LoRA factors: this library's and Flax's own.
_ANY_NNX_LORA = (*lora_nnx._NNX_LORA, nnx.LoRALinear, nnx.LoRA)


class _TargetMatcher:
    """A regex or list of regexes, full-matched against module paths; remembers what matched."""

    def __init__(self, targets: str | Sequence[str]):
        patterns = [targets] if isinstance(targets, str) else list(targets)
        if not patterns or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                f"targets must be a regex string or a non-empty list of them, got {targets!r}."
            )
        self.targets = targets
        self.compiled = []
        for p in patterns:
            try:
                self.compiled.append(re.compile(p))
            except re.error as e:
                raise ValueError(f"targets: invalid regular expression {p!r}: {e}") from e
        self.used: set[int] = set()

    def __call__(self, path: str) -> bool:
        hits = [i for i, c in enumerate(self.compiled) if c.fullmatch(path)]
        self.used.update(hits)
        return bool(hits)

    def check(self, linear_paths: Sequence[str]) -> None:
        """Raises naming the patterns that matched no module."""
        unused = [c.pattern for i, c in enumerate(self.compiled) if i not in self.used]
        if not unused:
            return
        shown = ", ".join(f"'{p}'" for p in list(linear_paths)[:12]) or "none"
        more = f" (and {len(linear_paths) - 12} more)" if len(linear_paths) > 12 else ""
        what = "matched no module" if len(unused) == len(self.compiled) else "match no module"
        raise ValueError(
            f"LoRA target pattern(s) {unused} {what}. A pattern must match the whole "
            f"'/'-joined module path; linear layers in this model: {shown}{more}."
        )


def _not_linear_error(path: str, module: Any, kinds: str) -> ValueError:
    if isinstance(module, (*_LINEN_LORA, *_ANY_NNX_LORA)):
        return ValueError(
            f"LoRA target rule matches '{path}', a {type(module).__name__}, which already has "
            "LoRA factors."
        )
    bases = [b for b, _ in lora_nnx._LORA_FOR_BASE if isinstance(module, b)]
    if bases:  # NNX replaces the layer: a subclass's own behaviour would be lost
        return ValueError(
            f"LoRA target rule matches '{path}', a {type(module).__name__}, a subclass of "
            f"nnx.{bases[0].__name__}. inject_nnx replaces a layer by this library's LoRA "
            "layer, which would drop what the subclass changes: give the subclass a LoRA term "
            "yourself, or narrow the regex."
        )
    return ValueError(
        f"LoRA target rule matches '{path}', a {type(module).__name__}, which is not a linear "
        f"layer ({kinds}). Narrow the regex so it matches only linear layers (it must match the "
        "whole module path)."
    )


def _interceptor(
    is_target: _TargetMatcher,
    lora: LoRAConfig,
    deterministic: bool,
    matched: list[str] | None = None,
    linear: list[str] | None = None,
) -> Callable[..., Any]:
    """The ``nn.intercept_methods`` interceptor that adds LoRA to the targeted layers' calls."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        is_linear = isinstance(module, _LINEN_LINEAR) and not isinstance(module, _LINEN_LORA)
        if is_linear and linear is not None:
            linear.append(path)
        if not is_target(path):
            return next_fun(*args, **kwargs)
        if not is_linear:
            raise _not_linear_error(path, module, "nn.Dense, nn.DenseGeneral, nn.Einsum")
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        delta = _lora_delta(module, x, lora, deterministic=deterministic, einsum_str=eq)
        if matched is not None:
            matched.append(path)
        return y + delta.astype(y.dtype)

    return interceptor


@dataclasses.dataclass(frozen=True)
class LinenLoRA:
    """A linen model with LoRA injected; made by
    [`inject_linen`][rplora_jax.layers.inject.inject_linen].

    Mirrors the ``init``/``apply`` of the wrapped module. Variables are the module's own plus
    ``lora_a``/``lora_b`` next to each targeted kernel.

    Attributes:
      module: the original linen module (unchanged).
      targets: the target regex(es).
      lora: the LoRA options.
    """

    module: nn.Module
    targets: str | Sequence[str]
    lora: LoRAConfig

    def _run(self, fn, deterministic, matched=None, linear=None):
        matcher = _TargetMatcher(self.targets)
        with nn.intercept_methods(_interceptor(matcher, self.lora, deterministic, matched, linear)):
            out = fn()
        if matched is not None:
            matcher.check(sorted(set(linear or [])))
        return out

    def init_with_paths(self, rngs: Any, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
        """Like `init`, also returning the sorted module paths that received LoRA."""
        matched: list[str] = []
        # One compiled init, not hundreds of eagerly dispatched ops; a bad rule fails while
        # tracing, before anything is compiled.
        init = jax.jit(lambda key: self.module.init(key, *args, **kwargs))
        variables = self._run(lambda: init(rngs), True, matched, [])
        return variables, sorted(set(matched))

    def target_paths(self, *args: Any, **kwargs: Any) -> list[str]:
        """The sorted module paths the targets select, found by tracing only (no compute).

        Args:
          *args: example inputs, as for ``init`` (without the rng).
          **kwargs: keyword arguments of ``init``.

        Returns:
          The paths; raises ``ValueError`` as `init` does for bad rules.
        """
        matched: list[str] = []
        init = lambda key: self.module.init(key, *args, **kwargs)
        self._run(lambda: jax.eval_shape(init, jax.random.key(0)), True, matched, [])
        return sorted(set(matched))

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """``module.init`` with LoRA; raises ``ValueError`` if a target matches no layer."""
        return self.init_with_paths(rngs, *args, **kwargs)[0]

    def apply(
        self, variables: Any, *args: Any, deterministic_lora: bool = True, **kwargs: Any
    ) -> Any:
        """``module.apply`` with LoRA.

        Args:
          variables: variables with the LoRA factors (from `init` or `init_from`).
          *args: positional arguments of ``module.apply``.
          deterministic_lora: set False to apply the LoRA dropout (pass a ``"dropout"`` rng).
          **kwargs: keyword arguments of ``module.apply`` (``rngs``, ``mutable``, ``method``...).

        Returns:
          What ``module.apply`` returns.
        """
        try:
            return self._run(
                lambda: self.module.apply(variables, *args, **kwargs), deterministic_lora
            )
        except flax.errors.ScopeParamNotFoundError as err:
            if "lora_" not in str(err):
                raise
            raise ValueError(
                f"LinenLoRA.apply: the variables have no LoRA factors where the targets need them "
                f"({err}). Make them with init(...) or init_from(pretrained, key, ...)."
            ) from err

    def init_from(self, variables: Any, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """New LoRA factors around existing (e.g. pretrained) ``variables``.

        Only the factors are initialised: under ``jax.jit`` XLA drops the unused base
        initialisation. Every other leaf comes from ``variables``, which must have exactly the
        model's variables (paths and shapes).

        Args:
          variables: the original model's variables.
          rngs: PRNG key(s) for the factors.
          *args: example inputs, as for ``init``.
          **kwargs: keyword arguments of ``init``.

        Returns:
          ``variables`` plus ``lora_a``/``lora_b`` for each targeted layer.
        """
        matched: list[str] = []

        def full_init(key):
            return self.module.init(key, *args, **kwargs)

        abstract = self._run(lambda: jax.eval_shape(full_init, rngs), True, matched, [])
        flat_abstract = traverse_util.flatten_dict(abstract)
        factor_keys = {
            k for k in flat_abstract if k[-1] in ("lora_a", "lora_b") and k[0] == "params"
        } & {("params", *p.split("/"), n) for p in matched for n in ("lora_a", "lora_b")}

        def init_factors(key):
            full = self._run(lambda: full_init(key), True)
            flat = traverse_util.flatten_dict(full)
            return {k: flat[k] for k in factor_keys}

        factors = jax.jit(init_factors)(rngs)
        given = traverse_util.flatten_dict(_unfreeze(variables))
        expected = {k: v for k, v in flat_abstract.items() if k not in factor_keys}
        _check_same_leaves(given, expected)
        return traverse_util.unflatten_dict({**given, **factors})

    def merge(self, variables: Any) -> Any:
        """Variables of the *original* module with ``s * a @ b`` folded into each kernel."""
        from rplora_jax.merge import merge

        return merge(_unfreeze(variables), scale=self.lora.scale)


def _unfreeze(tree: Any) -> Any:
    return tree.unfreeze() if hasattr(tree, "unfreeze") else tree


def _check_same_leaves(given: dict, expected: dict) -> None:
    missing = sorted("/".join(map(str, k)) for k in expected.keys() - given.keys())
    extra = sorted("/".join(map(str, k)) for k in given.keys() - expected.keys())
    if missing or extra:
        raise ValueError(
            "init_from: the variables do not match the model. "
            f"Missing: {missing[:8]}{'...' if len(missing) > 8 else ''}; "
            f"unexpected: {extra[:8]}{'...' if len(extra) > 8 else ''}."
        )
    for k, v in expected.items():
        if np.shape(given[k]) != tuple(v.shape):
            raise ValueError(
                f"init_from: '{'/'.join(map(str, k))}' has shape {np.shape(given[k])}, the model "
                f"expects {tuple(v.shape)}."
            )


def inject_linen(module: nn.Module, targets: str | Sequence[str], lora: LoRAConfig) -> LinenLoRA:
    """Adds LoRA to the ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` layers a regex names.

    Args:
      module: any linen module; its code is not changed.
      targets: regex (or list of regexes) that must fully match a module path such as
        ``"block_0/attn/query"``. Each pattern must match at least one layer.
      lora: the LoRA options.

    Returns:
      A [`LinenLoRA`][rplora_jax.layers.inject.LinenLoRA] with ``init``, ``init_from`` (pretrained
      weights), ``apply``, ``merge``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> import rplora_jax
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 4))
      >>> pretrained = model.init(jax.random.key(0), x)
      >>> lora = inject_linen(model, r"layers_0", rplora_jax.LoRAConfig(rank=2))
      >>> variables = lora.init_from(pretrained, jax.random.key(1), x)
      >>> bool((lora.apply(variables, x) == model.apply(pretrained, x)).all())
      True
      >>> [p.a_path for p in rplora_jax.find_lora_pairs(variables)]
      ['params/layers_0/lora_a']
    """
    _check_lora(lora, "inject_linen")
    if not isinstance(module, nn.Module):
        raise TypeError(f"inject_linen needs a linen Module, got {type(module).__name__}.")
    _TargetMatcher(targets)  # validates the patterns now
    return LinenLoRA(module, targets, lora)


def _nnx_path(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def _lora_class(module: nnx.Module) -> type | None:
    if isinstance(module, _ANY_NNX_LORA):
        return None
    return next((lora for base, lora in lora_nnx._LORA_FOR_BASE if type(module) is base), None)


def inject_nnx(
    model: nnx.Module, targets: str | Sequence[str], lora: LoRAConfig, *, rngs: nnx.Rngs
) -> list[str]:
    """Replaces, in place, the ``nnx.Linear``/``LinearGeneral``/``Einsum`` layers a regex names.

    Each becomes the matching layer of `rplora_jax.layers.lora_nnx` (``LoRALinear``,
    ``LoRALinearGeneral``, ``LoRAEinsum``), sharing the original ``kernel``/``bias`` variables
    and adding ``lora_a``/``lora_b`` (``nnx.LoRAParam``). Layers stacked by ``nnx.vmap`` get
    stacked factors; ``nnx.MultiHeadAttention``'s projections are ``LinearGeneral`` layers. A
    layer shared at several paths (tied weights) becomes one LoRA layer at all of them; the
    targets are matched against the one path ``nnx.iter_modules`` gives it. LoRA dropout
    (``lora.dropout_rate > 0``) follows ``model.train()`` / ``model.eval()``; injected into a
    model already in eval mode (every ``deterministic`` / ``use_running_average`` flag in it set,
    as ``model.eval()`` sets them), it starts deterministic too; a model with no such layer
    cannot say, so call ``model.eval()`` again after injecting.

    Args:
      model: the NNX model, modified in place.
      targets: regex (or list of regexes) that must fully match a path such as
        ``"blocks/0/attn/query"``. Each pattern must match at least one layer.
      lora: the LoRA options (``param_dtype=None``: each base layer's ``param_dtype``).
      rngs: random streams for the factors.

    Returns:
      The sorted paths of the replaced layers.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import rplora_jax
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> y0 = model(jnp.ones((1, 4)))
      >>> inject_nnx(model, r"layers/0", rplora_jax.LoRAConfig(rank=2), rngs=nnx.Rngs(2))
      ['layers/0']
      >>> bool((model(jnp.ones((1, 4))) == y0).all())
      True
    """
    _check_lora(lora, "inject_nnx")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"inject_nnx needs an nnx.Module, got {type(model).__name__}.")
    is_target = _TargetMatcher(targets)
    found, linear = [], []
    for path, module in nnx.iter_modules(model):
        name = _nnx_path(path)
        lora_cls = _lora_class(module)
        if lora_cls is not None:
            linear.append(name)
        if not is_target(name):
            continue
        if lora_cls is None:
            raise _not_linear_error(
                name or "<root>", module, "nnx.Linear, nnx.LinearGeneral, nnx.Einsum"
            )
        if not path:
            raise ValueError("inject_nnx cannot replace the root module itself; wrap it first.")
        found.append((path, lora_cls, module))
    is_target.check(sorted(linear))
    # nnx.Dropout starts in training mode; in a model already put in eval() mode the new LoRA
    # dropout must not be the one layer still dropping. eval() sets `deterministic` (Dropout,
    # MultiHeadAttention) and `use_running_average` (BatchNorm) to True.
    modes = {
        getattr(m, attr)
        for _, m in nnx.iter_modules(model)
        for attr in ("deterministic", "use_running_average")
        if isinstance(getattr(m, attr, None), bool)
    }
    new_for = {}
    for path, cls, m in found:
        try:
            new = new_for[id(m)] = cls.from_base(m, lora, rngs=rngs)
        except ValueError as err:
            raise ValueError(f"inject_nnx: '{_nnx_path(path)}': {err}") from err
        if new.lora_dropout is not None and modes == {True}:
            new.lora_dropout.deterministic = True
    # A layer shared at several paths (tied weights) gets the same LoRA layer at each of them.
    replaced = lora_nnx._replace_all(model, [(path, m) for path, _, m in found], new_for)
    return sorted(_nnx_path(path) for path in replaced)
