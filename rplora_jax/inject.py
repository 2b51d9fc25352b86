"""Add LoRA to an existing Flax model without editing its code.

Target layers are chosen by a regular expression on their module path, which must match the
*whole* path (``re.fullmatch``, like PEFT's regex ``target_modules``); a sequence of expressions
matches a path if any one does. Paths are ``/``-joined module names, e.g.
``"blocks_0/attn/query"`` in linen or ``"blocks/0/attn/query"`` in NNX.

* Linen (:func:`inject_linen`): the model's ``__call__`` runs under ``nn.intercept_methods``; every
  matching ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` call gets ``s * x @ a @ b`` added and
  ``lora_a``/``lora_b`` created next to its ``kernel``. The model's code and parameter names are
  untouched, so pretrained variables load as they are (:meth:`LinenLoRA.init_from`).
* NNX (:func:`inject_nnx`): matching ``nnx.Linear`` / ``nnx.Einsum`` submodules are replaced in
  place by :class:`rplora_jax.nnx.LoRALinear` / :class:`rplora_jax.nnx.LoRAEinsum` sharing the
  original ``kernel``/``bias`` variables.

``b`` starts at zero, so the injected model's outputs equal the original's exactly at
initialisation. A rule that matches no layer, or matches something that is not a linear layer,
is a ``ValueError`` naming the paths.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import nnx, traverse_util

from rplora_jax import linen as lora_linen
from rplora_jax import nnx as lora_nnx
from rplora_jax._common import ZEROS, AInit, Initializer

Targets = str | Sequence[str]

LINEN_LINEAR = (nn.Dense, nn.DenseGeneral, nn.Einsum)
LINEN_LORA = (lora_linen.LoRADense, lora_linen.LoRADenseGeneral, lora_linen.LoRAEinsum)
NNX_LINEAR = (nnx.Linear, nnx.Einsum)
NNX_LORA = (*lora_nnx.LORA_LAYERS, nnx.LoRALinear, nnx.LoRA)


def compile_targets(targets: Targets) -> Callable[[str], bool]:
    """Turns a regex or a sequence of regexes into a full-match predicate on module paths."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"targets must be a regex string or a non-empty list of them, got {targets!r}."
        )
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"targets: invalid regular expression {p!r}: {e}") from e
    return lambda path: any(c.fullmatch(path) for c in compiled)


def _not_linear_error(path: str, module: Any, kinds: str) -> ValueError:
    if isinstance(module, (*LINEN_LORA, *NNX_LORA)):
        return ValueError(
            f"LoRA target rule matches '{path}', a {type(module).__name__}, which already has "
            "LoRA factors."
        )
    return ValueError(
        f"LoRA target rule matches '{path}', a {type(module).__name__}, which is not a linear "
        f"layer ({kinds}). Narrow the regex so it matches only linear layers (it must match the "
        "whole module path)."
    )


def _matched_nothing_error(targets: Targets, linear_paths: Sequence[str]) -> ValueError:
    shown = ", ".join(f"'{p}'" for p in list(linear_paths)[:12]) or "none"
    more = f" (and {len(linear_paths) - 12} more)" if len(linear_paths) > 12 else ""
    return ValueError(
        f"LoRA target rule {targets!r} matched no module. The regex must match the whole "
        f"'/'-joined module path; linear layers in this model: {shown}{more}."
    )


def _linen_path(module: nn.Module) -> str:
    return "/".join(module.scope.path) if module.scope is not None else ""


def _linen_delta(module, args, kwargs, cfg, deterministic, path):
    x = args[0] if args else kwargs["inputs"]
    common = dict(
        deterministic=deterministic,
        dtype=module.dtype,
        base_param_dtype=module.param_dtype,
        precision=module.precision,
    )
    if isinstance(module, nn.Dense):
        return lora_linen.dense_delta(module, x, (x.ndim - 1,), (module.features,), cfg, **common)
    if isinstance(module, nn.DenseGeneral):
        if tuple(np.atleast_1d(module.batch_dims)):
            raise ValueError(
                f"LoRA on '{path}': nn.DenseGeneral with batch_dims={module.batch_dims} is not "
                "supported."
            )
        axis = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        axis = tuple(sorted(ax % x.ndim for ax in axis))
        features = (
            tuple(module.features) if isinstance(module.features, Sequence) else (module.features,)
        )
        return lora_linen.dense_delta(module, x, axis, features, cfg, **common)
    eq = module.einsum_str
    if eq is None:
        eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
    return lora_linen.einsum_delta(
        module, x, eq, module.shape, cfg, where=f"LoRA on '{path}'", **common
    )


def lora_interceptor(
    targets: Targets,
    config: lora_linen.LoRAConfig,
    *,
    deterministic: bool = True,
    matched: list[str] | None = None,
    linear: list[str] | None = None,
) -> Callable[..., Any]:
    """The ``nn.intercept_methods`` interceptor that :class:`LinenLoRA` uses.

    Use it directly to add LoRA inside your own ``init``/``apply`` calls::

        with nn.intercept_methods(lora_interceptor(r".*/(query|value)", LoRAConfig(rank=8))):
            variables = model.init(key, x)

    Args:
      targets: regex (or list) that must fully match a module path.
      config: LoRA options.
      deterministic: disables LoRA dropout.
      matched: if given, receives the path of every matched layer call.
      linear: if given, receives the path of every linear layer called.

    Returns:
      The interceptor.
    """
    is_target = compile_targets(targets)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or module.scope is None:
            return next_fun(*args, **kwargs)
        path = _linen_path(module)
        if isinstance(module, LINEN_LINEAR) and linear is not None:
            linear.append(path)
        if not is_target(path):
            return next_fun(*args, **kwargs)
        if not isinstance(module, LINEN_LINEAR):
            raise _not_linear_error(path, module, "nn.Dense, nn.DenseGeneral, nn.Einsum")
        y = next_fun(*args, **kwargs)
        delta = _linen_delta(module, args, kwargs, config, deterministic, path)
        if matched is not None:
            matched.append(path)
        return y + delta.astype(y.dtype)

    return interceptor


@dataclasses.dataclass(frozen=True)
class LinenLoRA:
    """A linen model with LoRA injected; made by :func:`inject_linen`.

    Mirrors the ``init``/``apply`` of the wrapped module. Variables are the module's own plus
    ``lora_a``/``lora_b`` next to each targeted kernel.

    Attributes:
      module: the original linen module (unchanged).
      targets: the target regex(es).
      config: LoRA options.
    """

    module: nn.Module
    targets: Targets
    config: lora_linen.LoRAConfig

    @property
    def scaling(self) -> float:
        """``s`` in ``W0 + s * a @ b`` for every injected layer."""
        return self.config.scaling

    def _run(self, fn, deterministic, matched=None, linear=None):
        interceptor = lora_interceptor(
            self.targets, self.config, deterministic=deterministic, matched=matched, linear=linear
        )
        with nn.intercept_methods(interceptor):
            return fn()

    def init_with_paths(self, rngs: Any, *args: Any, **kwargs: Any) -> tuple[Any, list[str]]:
        """Like :meth:`init`, also returning the sorted module paths that received LoRA."""
        matched: list[str] = []
        linear: list[str] = []

        def init(key):
            variables = self.module.init(key, *args, **kwargs)
            # Checked while tracing, so a bad rule fails before anything is compiled.
            if not matched:
                raise _matched_nothing_error(self.targets, sorted(set(linear)))
            return variables

        # One compiled init, not hundreds of eagerly dispatched ops.
        variables = self._run(lambda: jax.jit(init)(rngs), True, matched, linear)
        return variables, sorted(set(matched))

    def target_paths(self, *args: Any, **kwargs: Any) -> list[str]:
        """The sorted module paths the targets select, found by tracing only (no compute).

        Args:
          *args: example inputs, as for ``init`` (without the rng).
          **kwargs: keyword arguments of ``init``.

        Returns:
          The paths; raises ``ValueError`` as :meth:`init` does for bad rules.
        """
        paths: list[str] = []

        def trace(key):
            paths.extend(self.init_with_paths(key, *args, **kwargs)[1])
            return 0

        jax.eval_shape(trace, jax.random.key(0))
        return paths

    def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
        """``module.init`` with LoRA; raises ``ValueError`` if the targets match no layer."""
        return self.init_with_paths(rngs, *args, **kwargs)[0]

    def apply(
        self, variables: Any, *args: Any, deterministic_lora: bool = True, **kwargs: Any
    ) -> Any:
        """``module.apply`` with LoRA.

        Args:
          variables: variables with the LoRA factors (from :meth:`init` or :meth:`init_from`).
          *args: positional arguments of ``module.apply``.
          deterministic_lora: set False to apply the LoRA dropout (pass a ``"dropout"`` rng).
          **kwargs: keyword arguments of ``module.apply`` (``rngs``, ``mutable``, ``method``...).

        Returns:
          What ``module.apply`` returns.
        """
        return self._run(lambda: self.module.apply(variables, *args, **kwargs), deterministic_lora)

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
        linear: list[str] = []

        def full_init(key):
            return self.module.init(key, *args, **kwargs)

        abstract = self._run(lambda: jax.eval_shape(full_init, rngs), True, matched, linear)
        if not matched:
            raise _matched_nothing_error(self.targets, sorted(set(linear)))
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
        from rplora_jax.adapters import merge

        return merge(variables, self.scaling)


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


def inject_linen(
    module: nn.Module,
    targets: Targets,
    *,
    rank: int = 8,
    alpha: float | None = None,
    rslora: bool = False,
    dropout_rate: float = 0.0,
    a_init: AInit = "kaiming_uniform",
    b_init: Initializer = ZEROS,
    param_dtype: Any = None,
) -> LinenLoRA:
    """Adds LoRA to the ``nn.Dense``/``nn.DenseGeneral``/``nn.Einsum`` layers a regex names.

    Args:
      module: any linen module; its code is not changed.
      targets: regex (or list of regexes) that must fully match a module path such as
        ``"block_0/attn/query"``.
      rank, alpha, rslora, dropout_rate, a_init, b_init, param_dtype: see
        :class:`rplora_jax.linen.LoRAConfig`.

    Returns:
      A :class:`LinenLoRA` with ``init``, ``init_from`` (pretrained weights), ``apply``, ``merge``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import linen as nn
      >>> import rplora_jax
      >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
      >>> x = jnp.ones((1, 4))
      >>> pretrained = model.init(jax.random.key(0), x)
      >>> lora = inject_linen(model, r"layers_0", rank=2)
      >>> variables = lora.init_from(pretrained, jax.random.key(1), x)
      >>> bool((lora.apply(variables, x) == model.apply(pretrained, x)).all())
      True
      >>> [p.a_path for p in rplora_jax.find_lora_pairs(variables)]
      ['params/layers_0/lora_a']
    """
    config = lora_linen.LoRAConfig(
        rank=rank,
        alpha=alpha,
        rslora=rslora,
        dropout_rate=dropout_rate,
        a_init=a_init,
        b_init=b_init,
        param_dtype=param_dtype,
    )
    compile_targets(targets)
    return LinenLoRA(module, targets, config)


def _nnx_path(path: tuple[Any, ...]) -> str:
    return "/".join(str(p) for p in path)


def inject_nnx(
    model: nnx.Module,
    targets: Targets,
    *,
    rank: int = 8,
    alpha: float | None = None,
    rslora: bool = False,
    dropout_rate: float = 0.0,
    a_init: AInit = "kaiming_uniform",
    b_init: Initializer = ZEROS,
    lora_param_dtype: Any = None,
    rngs: nnx.Rngs,
) -> list[str]:
    """Replaces, in place, the ``nnx.Linear``/``nnx.Einsum`` submodules a regex names.

    Each becomes a :class:`rplora_jax.nnx.LoRALinear` / :class:`rplora_jax.nnx.LoRAEinsum` that
    shares the original ``kernel``/``bias`` variables and adds ``lora_a``/``lora_b``
    (``nnx.LoRAParam``). Layers stacked by ``nnx.vmap`` get stacked factors.

    Args:
      model: the NNX model, modified in place.
      targets: regex (or list of regexes) that must fully match a path such as
        ``"blocks/0/attn/query"``.
      rank, alpha, rslora, dropout_rate, a_init, b_init, lora_param_dtype: see
        :class:`rplora_jax.nnx.LoRALinear` (``lora_param_dtype=None``: the base's
        ``param_dtype``).
      rngs: random streams for the factors.

    Returns:
      The sorted paths of the replaced layers.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
      ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
      >>> y0 = model(jnp.ones((1, 4)))
      >>> inject_nnx(model, r"layers/0", rank=2, rngs=nnx.Rngs(2))
      ['layers/0']
      >>> bool((model(jnp.ones((1, 4))) == y0).all())
      True
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"inject_nnx needs an nnx.Module, got {type(model).__name__}.")
    is_target = compile_targets(targets)
    options = dict(
        rank=rank,
        alpha=alpha,
        rslora=rslora,
        dropout_rate=dropout_rate,
        a_init=a_init,
        b_init=b_init,
        lora_param_dtype=lora_param_dtype,
        rngs=rngs,
    )
    found, linear = [], []
    for path, module in nnx.iter_modules(model):
        name = _nnx_path(path)
        is_linear = isinstance(module, NNX_LINEAR) and not isinstance(module, NNX_LORA)
        if is_linear:
            linear.append(name)
        if not is_target(name):
            continue
        if not is_linear:
            raise _not_linear_error(name or "<root>", module, "nnx.Linear, nnx.Einsum")
        found.append((path, module))
    if not found:
        raise _matched_nothing_error(targets, sorted(linear))
    for path, module in found:
        if isinstance(module, nnx.Linear):
            new = lora_nnx.LoRALinear.from_linear(module, **options)
        else:
            new = lora_nnx.LoRAEinsum.from_einsum(module, **options)
        if not path:
            raise ValueError("inject_nnx cannot replace the root module itself; wrap it first.")
        parent = model
        for key in path[:-1]:
            parent = lora_nnx.get_child(parent, key)
        lora_nnx.set_child(parent, path[-1], new)
    return sorted(_nnx_path(p) for p, _ in found)
