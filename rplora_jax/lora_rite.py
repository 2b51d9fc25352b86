"""LoRA-RITE (Yen et al., ICLR 2025): adaptive steps that do not depend on how a pair is factored.

For a pair ``W = a @ b`` LoRA-RITE works in the column spaces of the factors. With the tall forms
``a: (in, r)`` and ``b.T: (out, r)`` written ``a = Q_a R_a``, ``b.T = Q_b R_b`` (``Q`` with
orthonormal columns), the *unmagnified* gradient ``g_a @ pinv(R_b)`` is the same whichever way
``W`` is split between ``a`` and ``b``. Adam's moments are kept on it, a second moment ``V``
(``r x r``) and a first moment ``M``, both carried into the current basis at each step by
``P = Q_b.T @ Q_b_prev``, and the step is mapped back through ``pinv(R_b)``; ``b`` likewise with
``a``'s basis. So the update of ``W`` is invariant to ``a -> a @ R``, ``b -> inv(R) @ b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from rplora_jax import _grouping, _linalg, _mesh, _pairwise
from rplora_jax._linalg import mm, sym, t
from rplora_jax._trees import is_masked, path_str
from rplora_jax.pairing import RuleSpec


class ScaleByLoraRiteState(NamedTuple):
    """State of [`scale_by_lora_rite`][rplora_jax.lora_rite.scale_by_lora_rite]; trees like the
    parameters, with ``optax.MaskedNode`` at leaves that are not LoRA factors.

    Attributes:
      count: the number of updates so far.
      mu: each factor's first moment, in the factor's layout (float32; float64 for float64
        factors).
      nu: each factor's ``(*stack, r, r)`` second moment.
      basis: each factor's orthonormal basis ``Q`` of the last step, in the factor's layout.
      escape: each factor's ``(*stack,)`` escaped mass (zero unless ``escaped_mass``).
    """

    count: jax.Array
    mu: Any
    nu: Any
    basis: Any
    escape: Any


def _decay(count, beta):
    """Adafactor's bias-corrected decay at 0-based step ``count``: 0 at the first step."""
    return beta * (1 - beta**count) / (1 - beta ** (count + 1))


def _sum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def _factorize(x, axes):
    """``(Q, pinv(R))`` with ``x = Q @ R``: ``R = (x.T x)^(1/2)``, any basis serving (the rule
    is invariant to it); directions below ``r * eps`` of the largest eigenvalue are dropped."""
    lam, v = _linalg.psd_eigh(_mesh.inner_rows(x, x, axes))
    keep = lam > x.shape[-1] * jnp.finfo(x.dtype).eps * lam[..., -1:]
    root = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
    r_pinv = mm(v * root[..., None, :], t(v))
    return mm(x, r_pinv), r_pinv


def _off(x) -> bool:
    """Whether a threshold is off (0) as a Python number; arrays (``inject_hyperparams``) are
    compared when traced."""
    return isinstance(x, (int, float)) and x <= 0


def _skip_and_norm(g, axes, threshold):
    """``g`` zeroed per layer where its RMS passes ``threshold``, and its squared norm."""
    sq = _sum(jnp.sum(g * g, axis=(-2, -1)), axes)
    size = _sum(g.shape[-2], axes) * g.shape[-1]
    if not _off(threshold):
        skip = (threshold > 0) & (jnp.sqrt(sq / size) > threshold)
        g, sq = jnp.where(skip[..., None, None], 0.0, g), jnp.where(skip, 0.0, sq)
    return g, sq


def _escape(v_old, v_moved, rho, beta2):
    """The escaped mass: second-moment mass lost to the change of basis, decayed."""
    drop = jnp.linalg.eigvalsh(v_old) - jnp.linalg.eigvalsh(v_moved)
    eig = jnp.maximum(jnp.max(drop, axis=-1), 0.0)
    trace = jnp.maximum(
        jnp.trace(v_old, axis1=-2, axis2=-1) - jnp.trace(v_moved, axis1=-2, axis2=-1), 0.0
    )
    return beta2 * (jnp.minimum(eig, trace) + rho)


def _side(g, q_other, q_other_old, r_pinv_other, nu, mu, rho, axes, other_axes, c):
    """One factor's step in the other's basis: ``(update, nu, mu, rho)``, all tall."""
    rows = _sum(g.shape[-2], axes)
    p = _mesh.inner_rows(q_other, q_other_old, other_axes)  # the change of basis, r x r
    moved = jnp.nan_to_num(sym(mm(mm(p, nu), t(p))))
    escaped = c["escaped_mass"]  # a bool, or an array under inject_hyperparams
    if escaped is False:
        rho = jnp.zeros_like(rho)
    else:
        rho = jnp.where(escaped, _escape(nu, moved, rho, c["b2"]), 0.0)
    nu = sym((1 - c["b2"]) * sym(_mesh.inner_rows(g, g, axes)) / rows + c["b2"] * moved)
    lam, e = _linalg.psd_eigh(nu)
    inv_root = 1 / (jnp.sqrt(lam + rho[..., None]) + c["eps"])
    u = jnp.nan_to_num(mm(g, sym(mm(e * inv_root[..., None, :], t(e)))))
    mu = (1 - c["b1"]) * u + c["b1"] * mm(mu, t(p))
    d, cap = mu, c["update_capping"]
    if not _off(cap):
        rms = jnp.sqrt(_sum(jnp.sum(d * d, axis=(-2, -1)), axes) / (rows * g.shape[-1]))
        capped = d / jnp.maximum(1.0, rms / cap)[..., None, None]
        d = jnp.where(cap > 0, capped, d)
    return mm(d, r_pinv_other), nu, mu, rho


def _unmagnified(a, b, g_a, g_b, kind: _grouping.Kind, threshold, layers) -> dict:
    """A chunk's bases, ``pinv(R)`` and unmagnified gradients (tall), with their squared norm
    summed over the chunk's pairs and layers; ``layers``: for a's and b's, the manual axes that
    split the stacked layers."""
    dtype, k = kind.dtype, kind.stacked
    q_a, rp_a = _factorize(_mesh.tall(a, kind.a_rank_axis, k, dtype), kind.a_sum)
    q_b, rp_b = _factorize(_mesh.tall(b, kind.b_rank_axis, k, dtype), kind.b_sum)
    ga, sq_a = _skip_and_norm(
        mm(_mesh.tall(g_a, kind.a_rank_axis, k, dtype), rp_b), kind.a_sum, threshold
    )
    gb, sq_b = _skip_and_norm(
        mm(_mesh.tall(g_b, kind.b_rank_axis, k, dtype), rp_a), kind.b_sum, threshold
    )
    # Layers split across devices (a stacked axis inside shard_map) are summed there too.
    sq = _sum(jnp.sum(sq_a), layers[0]) + _sum(jnp.sum(sq_b), layers[1])
    return dict(q_a=q_a, q_b=q_b, rp_a=rp_a, rp_b=rp_b, ga=ga, gb=gb, sq=sq)


def _second_pass(chunk, kind: _grouping.Kind, f: dict, scale, c: dict, fields, out, g_leaves):
    """The moments and steps of a chunk's pairs, written into ``out`` and the state ``fields``
    (lists per leaf: mu, nu, basis, escape)."""
    mu, nu, basis, escape = fields
    k, f32 = kind.stacked, kind.dtype
    index = {"a": [p.a_index for p in chunk], "b": [p.b_index for p in chunk]}
    axis = {"a": kind.a_rank_axis, "b": kind.b_rank_axis}
    tall = lambda field, s: _mesh.tall([field[i] for i in index[s]], axis[s], k, f32)
    stack = lambda field, s: jnp.stack([field[i] for i in index[s]])
    args = {
        "a": (f["ga"] * scale, f["q_b"], tall(basis, "b"), f["rp_b"], kind.a_sum, kind.b_sum),
        "b": (f["gb"] * scale, f["q_a"], tall(basis, "a"), f["rp_a"], kind.b_sum, kind.a_sum),
    }
    for s in ("a", "b"):
        g, q_other, q_old, r_pinv, axes, other_axes = args[s]
        step, new_nu, new_mu, rho = _side(
            g,
            q_other,
            q_old,
            r_pinv,
            stack(nu, s),
            tall(mu, s),
            stack(escape, s),
            axes,
            other_axes,
            c,
        )
        for n, i in enumerate(index[s]):
            like = g_leaves[i]
            out[i] = _linalg.cast_back(_mesh.untall(step[n], like, axis[s]), jnp.result_type(like))
            mu[i], nu[i], escape[i] = _mesh.untall(new_mu[n], like, axis[s]), new_nu[n], rho[n]
            basis[i] = _mesh.untall(f["q_" + s][n], like, axis[s])


def _dtype(x) -> Any:
    """The state's dtype for factor ``x``: its compute dtype (float32, or float64)."""
    return _linalg.compute_dtype(jnp.result_type(x))


def _per_layer_zeros(x, pair, shape: tuple) -> jax.Array:
    """Zeros of ``(*stack, *shape)``, sharded like the stacked axes of factor ``x`` on an
    Explicit mesh (replicated otherwise)."""
    zeros = jnp.zeros((*pair.info.stacked_shape, *shape), _dtype(x))
    explicit = _mesh.explicit_spec(x)
    if explicit is None or not any(explicit[1][: pair.stacked]):
        return zeros
    mesh, spec = explicit
    return jax.sharding.reshard(
        zeros, _mesh.named(mesh, (*spec[: pair.stacked], *(None,) * len(shape)))
    )


def _roles(pairs) -> dict[int, tuple[Any, int]]:
    """Each factor's leaf index: its pair and its rank axis."""
    return {
        i: (p, axis)
        for p in pairs
        for i, axis in ((p.a_index, p.a_rank_axis), (p.b_index, p.b_rank_axis))
    }


def _check_only_factors(pairs, params) -> None:
    roles = _roles(pairs)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
    others = [path_str(p) for i, (p, x) in enumerate(flat) if i not in roles and not is_masked(x)]
    if others:
        raise ValueError(
            f"lora_rite updates LoRA factors only, and these leaves are not: {others[:8]}. "
            "Freeze them (rplora_jax.freeze_base, nnx.Optimizer(..., wrt=nnx.LoRAParam)), or "
            "give them another optimizer with optax.partition."
        )


def scale_by_lora_rite(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    escaped_mass: bool = False,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    axis_name: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    """LoRA-RITE's preconditioned direction for every LoRA pair (no learning rate, no decay).

    Per pair, in tall form (``a: (in, r)``, ``b.T: (out, r)``; the ``b`` side mirrors ``a``'s
    with the roles of the factors swapped), with ``x = Q_x @ R_x`` for each factor::

        g = g_a @ pinv(R_b)                      # zeroed if RMS > update_skipping; all pairs'
                                                 # g clipped to norm clip_unmagnified_grad
        P = Q_b.T @ Q_b_prev
        V = c2 * sym(P V P.T) + (1 - c2) * g.T g / in
        M = c1 * M @ P.T + (1 - c1) * g @ inv(sqrt(V + rho I) + eps I)
        update_a = M @ pinv(R_b).T

    with Adafactor's bias-corrected decays ``c = beta (1 - beta^k) / (1 - beta^(k+1))`` at step
    ``k`` (0 at the first step). This follows the authors' PyTorch code (``LoRARite``,
    repository gkevinyen5418/LoRA-RITE, commit c9bb451), step by step, with these differences:

    - The factorization ``x = Q R`` is ``R = (x.T x)^(1/2)`` (from the Gram, so it is summed
      across devices under ``shard_map``) rather than Householder QR; the update does not
      depend on that choice. Directions of a factor below ``r`` float32 eps of its largest
      Gram eigenvalue (a rank-deficient factor, ``b = 0``) are dropped, where the authors'
      ``pinv`` keeps singular values down to ``r`` eps. From ``b = 0`` (LoRA's initialisation)
      both give ``a`` a zero first step and ``b`` the same one; for a factor that loses rank,
      the authors' QR completes its basis arbitrarily and carries moments along it, this
      basis drops them.
    - Eigenvalues of ``V`` that rounding makes slightly negative are taken as 0; the authors'
      code then takes a NaN square root and zeroes that factor's whole update.
    - The step count is one for the whole tree, and the update skipping, capping and clipping
      norms cover each stacked layer like a separate pair of the authors'.
    - Not offered: ``balance_param`` (rescaling the factors to equal norms after each step,
      off by default) and ``relative_epsilon`` (which fails in the authors' code).
    - ``escaped_mass`` (off by default, as in the authors' code) is their decayed form,
      ``rho = c2 * (rho + d)``.

    Every leaf must be a LoRA factor or masked (``freeze_base``,
    ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``, ``optax.partition``): another leaf is an error
    naming it, since LoRA-RITE has no rule for it.

    Args:
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the square roots of ``V``'s eigenvalues.
      clip_unmagnified_grad: clip the unmagnified gradients of all pairs together to this
        global norm; 0 turns it off.
      update_skipping: zero a factor's unmagnified gradient whose RMS passes this; 0 turns it
        off.
      update_capping: cap the RMS of each factor's step (before it is mapped back) at this;
        0 (default) turns it off.
      escaped_mass: add the second-moment mass lost to changes of basis to ``V``.
      rules: as in
        [`riemannian_preconditioner`][rplora_jax.preconditioner.riemannian_preconditioner].
      stacked_axes: as in ``riemannian_preconditioner``.
      axis_name: as in ``riemannian_preconditioner``: inside ``shard_map``, every sum over a
        factor's feature axes is completed over the axes that split them.
      specs: as in ``riemannian_preconditioner``.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``, with state
      [`ScaleByLoraRiteState`][rplora_jax.lora_rite.ScaleByLoraRiteState].

    References:
      Yen, Chen, Hsieh, Kumar, Chen, Wen, Xie & Hsieh, "LoRA Done RITE: Robust Invariant
      Transformation Equilibration for LoRA Optimization", ICLR 2025,
      https://arxiv.org/abs/2410.20625
    """
    for name, value in (("b1", b1), ("b2", b2)):
        if isinstance(value, (int, float)) and not 0 <= value < 1:
            raise ValueError(f"lora_rite: {name} must lie in [0, 1), got {value!r}.")
    if isinstance(eps, (int, float)) and eps < 0:
        raise ValueError(f"lora_rite: eps must be non-negative, got {eps!r}.")
    setup = _pairwise.setup(
        "lora_rite",
        rules=rules,
        stacked_axes=stacked_axes,
        allow_no_pairs=False,
        axis_name=axis_name,
        specs=specs,
    )
    consts = dict(
        b1=b1,
        b2=b2,
        eps=eps,
        update_capping=update_capping,
        escaped_mass=escaped_mass,
    )

    def init_fn(params):
        pairs, leaves, treedef = _pairwise.find(setup, params)
        _check_only_factors(pairs, params)
        roles = _roles(pairs)

        def per_leaf(make):
            return treedef.unflatten(
                [
                    make(x, roles[i][0]) if i in roles else optax.MaskedNode()
                    for i, x in enumerate(leaves)
                ]
            )

        r = lambda p: (p.info.rank, p.info.rank)
        return ScaleByLoraRiteState(
            count=jnp.zeros([], jnp.int32),
            mu=per_leaf(lambda x, _: jnp.zeros_like(x, _dtype(x))),
            nu=per_leaf(lambda x, p: _per_layer_zeros(x, p, r(p))),
            basis=per_leaf(lambda x, _: jnp.zeros_like(x, _dtype(x))),
            escape=per_leaf(lambda x, p: _per_layer_zeros(x, p, ())),
        )

    def update_fn(updates, state, params=None):
        pairs, p_leaves, g_leaves, treedef = _pairwise.gradients(setup, updates, params)
        _check_only_factors(pairs, params)
        fields = [treedef.flatten_up_to(x) for x in state[1:]]
        chunks = list(_pairwise.chunks(setup, pairs, p_leaves, g_leaves, params, _grouping.DEFAULT))
        count = state.count.astype(jnp.float32)
        c = dict(consts, b1=_decay(count, b1), b2=_decay(count, b2))
        by_spec = setup.specs is not None
        specs = _mesh.leaf_specs(setup.specs, params, setup.who) if by_spec else None

        def layers(i, x, kind, summed):
            return _mesh.layer_axes(x, kind.stacked, summed, specs and specs[i], by_spec)

        first = []
        for chunk, kind, a, b, g_a, g_b in chunks:
            split = (
                layers(chunk[0].a_index, a[0], kind, kind.a_sum),
                layers(chunk[0].b_index, b[0], kind, kind.b_sum),
            )
            first.append(_unmagnified(a, b, g_a, g_b, kind, update_skipping, split))
        norm = jnp.sqrt(sum(f["sq"] for f in first))
        clip, scale = clip_unmagnified_grad, 1.0
        if not _off(clip):
            scale = jnp.where((clip > 0) & (norm > clip), clip / norm, 1.0)
        out = list(g_leaves)
        for (chunk, kind, *_), f in zip(chunks, first, strict=True):
            _second_pass(chunk, kind, f, scale, c, fields, out, g_leaves)
        mu, nu, basis, escape = (treedef.unflatten(x) for x in fields)
        return treedef.unflatten(out), ScaleByLoraRiteState(
            optax.safe_increment(state.count), mu, nu, basis, escape
        )

    return optax.GradientTransformation(init_fn, update_fn)


def lora_rite(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    mask: Any = None,
    clip_unmagnified_grad: float = 1.0,
    update_skipping: float = 1.0,
    update_capping: float = 0.0,
    escaped_mass: bool = False,
    rules: RuleSpec | Sequence[RuleSpec] | None = None,
    stacked_axes: int | None = None,
    axis_name: Any = None,
    specs: Any = None,
) -> optax.GradientTransformation:
    """LoRA-RITE: [`scale_by_lora_rite`][rplora_jax.lora_rite.scale_by_lora_rite], then
    decoupled weight decay, then the learning rate, as the authors' ``LoRARite`` steps.

    Their defaults, which differ from Adam's: ``eps=1e-6`` (added to a square root),
    ``weight_decay=0``, and the unmagnified gradients clipped to norm 1 and skipped above RMS 1.

    Args:
      learning_rate: a float or an optax schedule.
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: as in ``scale_by_lora_rite``.
      weight_decay: added to the step as ``weight_decay * param`` before the learning rate.
      mask: weight-decay mask, as in ``optax.add_decayed_weights``.
      clip_unmagnified_grad: as in ``scale_by_lora_rite``.
      update_skipping: as in ``scale_by_lora_rite``.
      update_capping: as in ``scale_by_lora_rite``.
      escaped_mass: as in ``scale_by_lora_rite``.
      rules: as in ``riemannian_preconditioner``.
      stacked_axes: as in ``riemannian_preconditioner``.
      axis_name: as in ``riemannian_preconditioner``.
      specs: as in ``riemannian_preconditioner``.

    Returns:
      An ``optax.GradientTransformation`` whose ``update`` needs ``params``.

    References:
      Yen et al., "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA
      Optimization", ICLR 2025, https://arxiv.org/abs/2410.20625

    Examples:
      >>> import jax, jax.numpy as jnp, rplora_jax
      >>> params = {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}
      >>> tx = rplora_jax.lora_rite(1e-2)
      >>> grads = {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.full((2, 3), 0.1)}
      >>> updates, state = tx.update(grads, tx.init(params), params)
      >>> float(jnp.abs(updates["lora_a"]).max())  # b = 0: a does not move at first
      0.0
    """
    return optax.chain(
        scale_by_lora_rite(
            b1,
            b2,
            eps,
            clip_unmagnified_grad=clip_unmagnified_grad,
            update_skipping=update_skipping,
            update_capping=update_capping,
            escaped_mass=escaped_mass,
            rules=rules,
            stacked_axes=stacked_axes,
            axis_name=axis_name,
            specs=specs,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
