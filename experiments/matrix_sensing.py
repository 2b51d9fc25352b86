"""Ill-conditioned low-rank matrix sensing: GD vs scaled GD, AdamW vs scaled AdamW.

The classic benchmark of Tong, Ma & Chi (2021, "ScaledGD"): recover ``X* = U diag(σ) Vᵀ``
(``n x n``, rank ``r``, ``σ = linspace(1, 1/κ, r)``) from ``m`` Gaussian measurements
``y_i = <A_i, X*>`` (entries of ``A_i`` are ``N(0, 1/m)``) by minimising
``f(L, R) = ½ ‖A(L Rᵀ) - y‖²`` from the spectral initialisation. The factors are held as a LoRA
pair ``{"lora_a": L, "lora_b": Rᵀ}``, so ``rplora_jax.scaled_sgd(reg=0)`` *is* ScaledGD:
``L <- L - η ∇_L f (RᵀR)⁻¹``, ``R <- R - η ∇_R f (LᵀL)⁻¹``.

For every condition number κ this reports the iterations each optimizer needs to reach relative
error ``‖L Rᵀ - X*‖_F / ‖X*‖_F <= tol``, and plots the error against the iteration. AdamW and
scaled AdamW run at every learning rate of a small sweep; the plot shows each at its best rate.

Each ``--seeds`` value is an independent problem instance (its own operator and ground truth),
run one after the other. The per-seed counts are summarised as a median and range over the seeds,
and each preconditioned optimizer is compared with its plain counterpart, seed by seed, as the
geometric mean of the iteration ratio with a 95% t-interval (on the log ratios).

Within one instance all runs share the sensing operator and are advanced together: the two
products with ``A`` (``m x n²``, 1.6 GB at the default size) per iteration are batched over every
unfinished run, which is what makes the default size affordable on a CPU. A run leaves the batch
once it reaches ``tol`` or its iteration cap.

    python -m experiments.matrix_sensing               # the paper's setting, 5 instances
                                                       # (2 CPU cores: ~37 min per instance)
    python -m experiments.matrix_sensing --n 60 --r 5  # a quick look (seconds per instance)

Writes to ``--out``: ``summary.csv`` (every run at every seed), ``aggregate.csv`` (per κ and
optimizer over the seeds), ``paired.csv`` (the paired ratios), ``summary.md`` (the command line
and both tables, in words), and, for the first seed only, ``traces.csv`` and
``error_vs_iteration.png``. The summaries are rewritten after every seed.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rplora_jax
from experiments.commands import command_line
from experiments.stats import t_interval

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Sensing:
    """A batch of sensing problems that share one operator.

    Attributes:
      a: ``(m, n*n)`` measurement matrix; row ``i`` is ``vec(A_i)`` (row-major).
      a_t: its transpose, materialised once: XLA's CPU matmul is several times slower on a
        transposed operand than on a contiguous one.
      x_star: ``(K, n, n)`` ground truths, one per condition number.
      y: ``(K, m)`` measurements of each ground truth.
      kappas: the K condition numbers.
      rank: ``r``.
    """

    a: jax.Array
    a_t: jax.Array
    x_star: jax.Array
    y: jax.Array
    kappas: tuple[float, ...]
    rank: int

    @property
    def n(self) -> int:
        return self.x_star.shape[-1]


def make_sensing(n: int, r: int, m: int, kappas: Sequence[float], *, seed: int = 0) -> Sensing:
    """Draws ``U, V`` (shared by all κ) and the Gaussian operator, and measures each ``X*``.

    Args:
      n: matrix size.
      r: rank.
      m: number of measurements.
      kappas: condition numbers; ``σ = linspace(1, 1/κ, r)`` for each.
      seed: PRNG seed.

    Returns:
      A :class:`Sensing`.

    Example:
      >>> s = make_sensing(20, 2, 200, [1.0, 10.0])
      >>> s.y.shape
      (2, 200)
    """
    if not 0 < r <= n:
        raise ValueError(f"rank r must be in [1, n={n}], got {r}.")
    if m < r * (2 * n - r):
        raise ValueError(f"m={m} measurements cannot identify a rank-{r} {n}x{n} matrix.")
    if any(k < 1 for k in kappas):
        raise ValueError(f"condition numbers must be >= 1, got {list(kappas)}.")
    k_u, k_v, k_a = jax.random.split(jax.random.key(seed), 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k_u, (n, r)))
    v, _ = jnp.linalg.qr(jax.random.normal(k_v, (n, r)))
    sigmas = jnp.stack([jnp.linspace(1.0, 1.0 / k, r) for k in kappas])
    x_star = jnp.einsum("ik,ck,jk->cij", u, sigmas, v)
    a = jax.random.normal(k_a, (m, n * n), jnp.float32) / math.sqrt(m)
    a_t = jax.jit(jnp.transpose)(a)
    y = (a @ x_star.reshape(len(kappas), n * n).T).T
    return Sensing(a, a_t, x_star, y, tuple(float(k) for k in kappas), r)


def spectral_init(s: Sensing) -> Params:
    """Top-r SVD of ``A*(y)``, split evenly: ``L = U₀ Σ₀^½``, ``Rᵀ = Σ₀^½ V₀ᵀ`` (batched over κ)."""
    back = (s.a_t @ s.y.T).T.reshape(-1, s.n, s.n)
    u, sv, vt = jnp.linalg.svd(back)
    root = jnp.sqrt(sv[:, : s.rank])
    return {
        "lora_a": u[:, :, : s.rank] * root[:, None, :],
        "lora_b": root[:, :, None] * vt[:, : s.rank, :],
    }


def relative_error(params: Params, x_star: jax.Array) -> jax.Array:
    """``‖a @ b - X*‖_F / ‖X*‖_F`` per batch element."""
    x = jnp.matmul(params["lora_a"], params["lora_b"], precision=jax.lax.Precision.HIGHEST)
    return jnp.linalg.norm(x - x_star, axis=(-2, -1)) / jnp.linalg.norm(x_star, axis=(-2, -1))


def _scaled_sgd(learning_rate: float) -> optax.GradientTransformation:
    # A fixed signature: inject_hyperparams cannot see through scaled_sgd's **pairing.
    return rplora_jax.scaled_sgd(learning_rate, reg=0.0)


def _scaled_adamw(learning_rate: float, weight_decay: float) -> optax.GradientTransformation:
    return rplora_jax.scaled_adamw(learning_rate, weight_decay=weight_decay, reg=0.0)


# Optimizer families. The learning rate is a state leaf (inject_hyperparams), so runs of one
# family at different rates share one vmapped update.
FAMILIES = {
    "gd": lambda wd: optax.inject_hyperparams(optax.sgd)(learning_rate=0.0),
    "scaled_gd": lambda wd: optax.inject_hyperparams(_scaled_sgd)(learning_rate=0.0),
    "adamw": lambda wd: optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, weight_decay=wd),
    "scaled_adamw": lambda wd: optax.inject_hyperparams(_scaled_adamw)(
        learning_rate=0.0, weight_decay=wd
    ),
}


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: an optimizer family at a learning rate, on problem ``kappa_idx``."""

    family: str
    lr: float
    kappa_idx: int
    max_iters: int


def _family_state(tx, params: Params, lrs: np.ndarray):
    state = jax.vmap(tx.init)(params)
    return _set_lr(state, jnp.asarray(lrs, jnp.float32))


def _set_lr(state, lrs):
    # inject_hyperparams keeps its state as the last element of the chain-free state.
    return state._replace(hyperparams={**state.hyperparams, "learning_rate": lrs})


def _make_advance(families: tuple[str, ...], weight_decay: float, chunk: int):
    """Jitted ``chunk`` iterations of every family's batch; returns errors per iteration."""
    txs = [FAMILIES[f](weight_decay) for f in families]

    def gradients(s_a, s_a_t, y, params_list):
        # One product with A and one with Aᵀ for all runs of all families together.
        a_all = jnp.concatenate([p["lora_a"] for p in params_list])
        b_all = jnp.concatenate([p["lora_b"] for p in params_list])
        x = jnp.matmul(a_all, b_all, precision=jax.lax.Precision.HIGHEST)
        bsz, n, _ = x.shape
        # The barriers keep XLA:CPU from fusing the subtraction and transposes into the two big
        # products: fused, they leave its fast matmul for a slow loop (two runs at n = 200 took
        # 10 s per iteration instead of 0.36 s).
        barrier = jax.lax.optimization_barrier
        residual = barrier(s_a @ x.reshape(bsz, n * n).T) - y.T  # (m, B)
        g_x = barrier(s_a_t @ residual).T.reshape(bsz, n, n)
        g_a = jnp.matmul(g_x, jnp.swapaxes(b_all, -1, -2), precision=jax.lax.Precision.HIGHEST)
        g_b = jnp.matmul(jnp.swapaxes(a_all, -1, -2), g_x, precision=jax.lax.Precision.HIGHEST)
        out, start = [], 0
        for p in params_list:
            k = p["lora_a"].shape[0]
            out.append({"lora_a": g_a[start : start + k], "lora_b": g_b[start : start + k]})
            start += k
        return out

    def one_step(carry, _, s_a, s_a_t, ys, x_stars):
        params_list, states = carry
        grads = gradients(s_a, s_a_t, jnp.concatenate(ys), params_list)
        new_params, new_states, errs = [], [], []
        for tx, p, st, g, xs in zip(txs, params_list, states, grads, x_stars, strict=True):
            upd, st = jax.vmap(tx.update)(g, st, p)
            p = optax.apply_updates(p, upd)
            new_params.append(p)
            new_states.append(st)
            errs.append(relative_error(p, xs))
        return (new_params, new_states), jnp.concatenate(errs)

    @jax.jit
    def advance(params_list, states, s_a, s_a_t, ys, x_stars):
        step = lambda c, x: one_step(c, x, s_a, s_a_t, ys, x_stars)
        (params_list, states), errs = jax.lax.scan(step, (params_list, states), None, chunk)
        return params_list, states, errs  # errs: (chunk, B)

    return advance


def run_all(
    s: Sensing,
    runs: Sequence[Run],
    *,
    tol: float = 1e-5,
    weight_decay: float = 0.0,
    chunk: int = 25,
    progress: bool = False,
) -> list[np.ndarray]:
    """Runs every :class:`Run` from the spectral initialisation; returns each one's error trace.

    Args:
      s: the problems.
      runs: what to run; runs of one family are batched with ``vmap``.
      tol: a run stops (at the end of its chunk) once its relative error is ``<= tol``.
      weight_decay: AdamW's decoupled weight decay (0 keeps the exact solution a fixed point).
      chunk: iterations per jitted call.
      progress: show a tqdm bar over the longest cap.

    Returns:
      For each run, relative errors at iterations ``0, 1, ...`` (index 0 is the initialisation).

    Example:
      >>> s = make_sensing(20, 2, 200, [1.0])
      >>> [t] = run_all(s, [Run("scaled_gd", 0.5, 0, 100)])
      >>> bool(t[-1] < 1e-3)
      True
    """
    init = spectral_init(s)
    init_err = np.asarray(relative_error(init, s.x_star))
    traces = [[np.array([init_err[r.kappa_idx]])] for r in runs]
    active = list(range(len(runs)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(r.max_iters for r in runs), desc="iterations", unit="it")
    # Per-run state lives in per-family batches; rebuilt (and recompiled) when runs finish.
    params = {i: jax.tree.map(lambda x, k=runs[i].kappa_idx: x[k], init) for i in active}
    opt_state: dict[int, object] = {}
    while active:
        families = tuple(sorted({runs[i].family for i in active}))
        groups = [[i for i in active if runs[i].family == f] for f in families]
        txs = [FAMILIES[f](weight_decay) for f in families]
        p_list, st_list = [], []
        for tx, g in zip(txs, groups, strict=True):
            p = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[i] for i in g])
            if all(i in opt_state for i in g):
                st = jax.tree.map(lambda *xs: jnp.stack(xs), *[opt_state[i] for i in g])
            else:
                st = _family_state(tx, p, np.array([runs[i].lr for i in g]))
            p_list.append(p)
            st_list.append(st)
        ys = [s.y[np.array([runs[i].kappa_idx for i in g])] for g in groups]
        xs = [s.x_star[np.array([runs[i].kappa_idx for i in g])] for g in groups]
        order = [i for g in groups for i in g]
        advance = _make_advance(families, weight_decay, chunk)
        while True:
            p_list, st_list, errs = advance(p_list, st_list, s.a, s.a_t, ys, xs)
            errs = np.asarray(errs)
            if bar is not None:
                bar.update(chunk)
            for col, i in enumerate(order):
                if i not in active:
                    continue  # finished, but still in the batch until the next rebuild
                traces[i].append(errs[:, col])
                n_done = sum(len(t) for t in traces[i]) - 1
                if (
                    n_done >= runs[i].max_iters
                    or errs[:, col].min() <= tol
                    or not np.isfinite(errs[-1, col])
                ):
                    active.remove(i)
            # Shrinking the batch costs a recompile, so only do it once it has halved.
            if len(active) <= len(order) // 2:
                break
        # Unstack the survivors and carry on with a smaller batch.
        for gi, g in enumerate(groups):
            for j, i in enumerate(g):
                if i not in active:
                    continue
                params[i] = jax.tree.map(lambda x, j=j: x[j], p_list[gi])
                opt_state[i] = jax.tree.map(lambda x, j=j: x[j], st_list[gi])
    if bar is not None:
        bar.close()
    out = []
    for r, t in zip(runs, traces, strict=True):
        trace = np.concatenate(t)[: r.max_iters + 1]
        hit = np.flatnonzero(trace <= tol)
        out.append(trace[: hit[0] + 1] if hit.size else trace)
    return out


def iterations_to(trace: np.ndarray, tol: float) -> int | None:
    """First iteration whose error is ``<= tol``, or ``None``."""
    hit = np.flatnonzero(trace <= tol)
    return int(hit[0]) if hit.size else None


def best_lr_runs(runs: Sequence[Run], traces: Sequence[np.ndarray], tol: float) -> dict:
    """For each (family, κ index), the run with the fewest iterations to ``tol``.

    Runs that never reach ``tol`` rank after those that do, by their final error.
    """
    best: dict[tuple[str, int], int] = {}

    def key(i):
        it = iterations_to(traces[i], tol)
        return (0, it, 0.0) if it is not None else (1, 0, float(traces[i][-1]))

    for i, r in enumerate(runs):
        k = (r.family, r.kappa_idx)
        if k not in best or key(i) < key(best[k]):
            best[k] = i
    return best


SUMMARY_COLUMNS = (
    "seed",
    "optimizer",
    "kappa",
    "lr",
    "iters_to_tol",
    "iters_run",
    "final_rel_error",
    "best_lr",
)
AGGREGATE_COLUMNS = (
    "kappa",
    "optimizer",
    "seeds",
    "reached",
    "median_iters",
    "min_iters",
    "max_iters",
    "cap",
    "modal_lr",
    "modal_lr_seeds",
)
PAIRED_COLUMNS = (
    "kappa",
    "treatment",
    "control",
    "seeds_both",
    "geo_mean_ratio",
    "ratio_lo",
    "ratio_hi",
    "only_treatment_reached",
    "only_control_reached",
    "verdict",
)
# (treatment, control): the paired ratio is control's iterations over treatment's.
PAIRS = (("scaled_gd", "gd"), ("scaled_adamw", "adamw"))


def summary_rows(seed: int, s: Sensing, runs, traces, tol: float, best: dict) -> list[dict]:
    """One ``summary.csv`` row per run of one problem instance (``iters_to_tol`` None: not hit)."""
    rows = []
    for i, (r, t) in enumerate(zip(runs, traces, strict=True)):
        rows.append(
            {
                "seed": seed,
                "optimizer": r.family,
                "kappa": s.kappas[r.kappa_idx],
                "lr": r.lr,
                "iters_to_tol": iterations_to(t, tol),
                "iters_run": len(t) - 1,
                "final_rel_error": float(t[-1]),
                "best_lr": int(best[(r.family, r.kappa_idx)] == i),
            }
        )
    return rows


def _best_rows(rows: Sequence[dict]) -> dict[tuple[float, str, int], dict]:
    """``(kappa, optimizer, seed) -> the row at the best rate``."""
    return {(r["kappa"], r["optimizer"], r["seed"]): r for r in rows if int(r["best_lr"])}


def _fmt(x: float, digits: int = 4) -> str:
    return "" if not math.isfinite(x) else f"{x:.{digits}g}"


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Per (κ, optimizer): iterations to ``tol`` at each seed's best rate, over the seeds.

    A seed that did not reach ``tol`` within its cap counts as more iterations than any seed that
    did, so the median is over all seeds (``inf``, i.e. "above the cap", when half or more of
    them missed) and ``max_iters`` is ``inf`` when any seed missed; ``cap`` is then the longest
    of the missed runs (None when every seed reached ``tol``). ``modal_lr`` is the rate
    chosen most often (the smallest such rate on a tie) and ``modal_lr_seeds`` how often.
    """
    best = _best_rows(rows)
    seeds = sorted({r["seed"] for r in rows})
    kappas = list(dict.fromkeys(r["kappa"] for r in rows))
    families = [f for f in FAMILIES if any(r["optimizer"] == f for r in rows)]
    out = []
    for kappa in kappas:
        for f in families:
            picked = [best[(kappa, f, sd)] for sd in seeds if (kappa, f, sd) in best]
            iters = np.array(
                [np.inf if r["iters_to_tol"] is None else r["iters_to_tol"] for r in picked],
                np.float64,
            )
            missed = [r["iters_run"] for r in picked if r["iters_to_tol"] is None]
            lrs = [r["lr"] for r in picked]
            counts = {lr: lrs.count(lr) for lr in sorted(set(lrs))}
            modal = max(counts, key=lambda lr: (counts[lr], -lr))
            out.append(
                {
                    "kappa": kappa,
                    "optimizer": f,
                    "seeds": len(picked),
                    "reached": int(np.isfinite(iters).sum()),
                    "median_iters": float(np.median(iters)),
                    "min_iters": float(iters.min()),
                    "max_iters": float(iters.max()),
                    "cap": max(missed) if missed else None,
                    "modal_lr": modal,
                    "modal_lr_seeds": counts[modal],
                }
            )
    return out


def paired_comparison(rows: Sequence[dict], treatment: str, control: str) -> list[dict]:
    """Per κ: ``control / treatment`` iterations to ``tol`` at each seed's best rates.

    Summarised over the seeds where both reached ``tol`` as the geometric mean ratio and the
    exponentiated 95% t-interval of the mean log ratio; seeds where only one of the two reached
    ``tol`` are counted, not used in the ratio. A ratio above 1 means ``treatment`` needed fewer
    iterations.

    Example:
      >>> rows = [
      ...     {"seed": sd, "optimizer": f, "kappa": 1.0, "lr": 0.5, "iters_to_tol": it,
      ...      "iters_run": it, "best_lr": 1}
      ...     for sd, (a, b) in enumerate([(100, 200), (100, 220), (110, 200)])
      ...     for f, it in (("scaled_gd", a), ("gd", b))
      ... ]
      >>> [p] = paired_comparison(rows, "scaled_gd", "gd")
      >>> p["seeds_both"], round(p["geo_mean_ratio"], 3), p["verdict"]
      (3, 2.0, 'scaled_gd needs fewer iterations')
    """
    best = _best_rows(rows)
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for kappa in dict.fromkeys(r["kappa"] for r in rows):
        ratios, both, only_t, only_c = [], [], 0, 0
        for sd in seeds:
            t, c = best.get((kappa, treatment, sd)), best.get((kappa, control, sd))
            if t is None or c is None:
                continue
            hit_t, hit_c = t["iters_to_tol"] is not None, c["iters_to_tol"] is not None
            if hit_t and hit_c:
                # max(., 1): a run that starts within tol counts as one iteration.
                ratios.append(max(c["iters_to_tol"], 1) / max(t["iters_to_tol"], 1))
                both.append(sd)
            only_t += hit_t and not hit_c
            only_c += hit_c and not hit_t
        if ratios:
            mean, lo, hi = t_interval(np.log(ratios))
            geo, r_lo, r_hi = math.exp(mean), math.exp(lo), math.exp(hi)
        else:
            geo = r_lo = r_hi = float("nan")
        if not (math.isfinite(r_lo) and math.isfinite(r_hi)):
            verdict = "no interval (fewer than 2 seeds where both reached tol)"
        elif r_lo <= 1 <= r_hi:
            verdict = "within noise"
        elif r_lo > 1:
            verdict = f"{treatment} needs fewer iterations"
        else:
            verdict = f"{control} needs fewer iterations"
        out.append(
            {
                "kappa": kappa,
                "treatment": treatment,
                "control": control,
                "seeds_both": len(ratios),
                "geo_mean_ratio": geo,
                "ratio_lo": r_lo,
                "ratio_hi": r_hi,
                "only_treatment_reached": only_t,
                "only_control_reached": only_c,
                "verdict": verdict,
                "ratios": ratios,
                "ratio_seeds": both,
            }
        )
    return out


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict], fmt) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([fmt(c, r[c]) for c in columns])


def _csv_value(column: str, v) -> str:
    if v is None:
        return ""
    if column == "final_rel_error":
        return f"{v:.3e}"
    if column in ("geo_mean_ratio", "ratio_lo", "ratio_hi"):
        return _fmt(v)
    if column in ("median_iters", "min_iters", "max_iters"):
        return "" if not math.isfinite(v) else f"{v:g}"
    return str(v)


def _iters_cell(a: dict) -> str:
    """``"103 (101-105), 5/5"``; a count above the cap shows as ``">cap"``."""

    def show(x: float) -> str:
        return f"{x:g}" if math.isfinite(x) else f">{a['cap']}"

    if a["reached"] == 0:
        body = f"not reached (cap {a['cap']})"
    elif a["min_iters"] == a["max_iters"]:
        body = show(a["median_iters"])
    elif math.isfinite(a["max_iters"]):
        body = f"{show(a['median_iters'])} ({show(a['min_iters'])}-{show(a['max_iters'])})"
    else:
        body = f"{show(a['median_iters'])} ({show(a['min_iters'])} to {show(a['max_iters'])})"
    return f"{body}, {a['reached']}/{a['seeds']}"


NAMES = {"gd": "GD", "scaled_gd": "scaled GD", "adamw": "AdamW", "scaled_adamw": "scaled AdamW"}


def summary_markdown(
    rows: Sequence[dict], command: str, setup: str, tol: float, first_seed: int
) -> tuple[str, list[dict], list[dict]]:
    """``summary.md`` for ``rows``; also returns the aggregate and paired rows it shows."""
    agg = aggregate(rows)
    paired = [p for t, c in PAIRS for p in paired_comparison(rows, t, c)]
    paired.sort(key=lambda p: p["kappa"])  # stable: per κ, GD's pair before AdamW's
    seeds = sorted({r["seed"] for r in rows})
    families = list(dict.fromkeys(a["optimizer"] for a in agg))
    kappas = list(dict.fromkeys(a["kappa"] for a in agg))
    by = {(a["kappa"], a["optimizer"]): a for a in agg}
    lines = [
        "# Matrix sensing over random problem instances",
        "",
        "Produced by:",
        "",
        f"    {command}",
        "",
        f"{setup}. {len(seeds)} independent instances (seeds {' '.join(map(str, seeds))}): each "
        "seed draws its own operator `A` and ground truth `X*`. `summary.csv` has every run at "
        "every seed; `traces.csv` and `error_vs_iteration.png` are for the first seed "
        f"({first_seed}) only.",
        "",
        f"## Iterations to relative error {tol:g}",
        "",
        "Each cell: median over the seeds (min-max), then how many seeds reached tol within the "
        "cap. A seed that did not reach tol counts as more than the cap (`>cap`). The AdamW "
        "families use each seed's own best rate of the sweep (fewest iterations; lowest final "
        "error where no rate reached tol); `best lr` is the rate chosen most often and on how "
        "many seeds.",
        "",
    ]
    header = ["κ"]
    for f in families:
        header.append(NAMES.get(f, f))
        if f in ("adamw", "scaled_adamw"):
            header.append(f"{NAMES[f]} best lr")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kappa in kappas:
        cells = [f"{kappa:g}"]
        for f in families:
            a = by[(kappa, f)]
            cells.append(_iters_cell(a))
            if f in ("adamw", "scaled_adamw"):
                cells.append(f"{a['modal_lr']:g} ({a['modal_lr_seeds']}/{a['seeds']})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Paired comparison",
        "",
        "Per seed, the ratio of iterations to tol, control / treatment (GD / scaled GD, AdamW / "
        "scaled AdamW at each one's best rate for that seed); above 1 means the preconditioned "
        "optimizer needed fewer. Summarised over the seeds where both reached tol as the "
        "geometric mean ratio with a 95% t-interval computed on the log ratios (sample sd) and "
        "exponentiated. Seeds where only one of the two reached tol are counted, not in the "
        "ratio. An interval that contains 1 is within noise.",
        "",
        "| κ | control / treatment | seeds (both) | geo. mean ratio | 95% interval | "
        "only treatment reached | only control reached | per-seed ratios | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in paired:
        interval = (
            f"{_fmt(p['ratio_lo'])} to {_fmt(p['ratio_hi'])}"
            if math.isfinite(p["ratio_lo"])
            else "none"
        )
        per_seed = ", ".join(
            f"{x:.2f} (s{sd})" for x, sd in zip(p["ratios"], p["ratio_seeds"], strict=True)
        )
        lines.append(
            f"| {p['kappa']:g} | {NAMES.get(p['control'], p['control'])} / "
            f"{NAMES.get(p['treatment'], p['treatment'])} | {p['seeds_both']}/{len(seeds)} | "
            f"{_fmt(p['geo_mean_ratio']) or 'none'} | {interval} | "
            f"{p['only_treatment_reached']} | {p['only_control_reached']} | {per_seed} | "
            f"{p['verdict']} |"
        )
    lines += [
        "",
        "In words:",
        "",
    ]
    for p in paired:
        t, c = NAMES.get(p["treatment"], p["treatment"]), NAMES.get(p["control"], p["control"])
        if p["seeds_both"] >= 2:
            s = (
                f"- κ = {p['kappa']:g}, {t} vs {c}: {c} took {_fmt(p['geo_mean_ratio'])}x the "
                f"iterations of {t} (geometric mean over {p['seeds_both']} seeds, 95% interval "
                f"{_fmt(p['ratio_lo'])} to {_fmt(p['ratio_hi'])}): {p['verdict']}."
            )
        else:
            s = (
                f"- κ = {p['kappa']:g}, {t} vs {c}: both reached tol on {p['seeds_both']} "
                "seed(s), too few for an interval."
            )
        extra = []
        if p["only_treatment_reached"]:
            extra.append(f"only {t} reached tol on {p['only_treatment_reached']} seed(s)")
        if p["only_control_reached"]:
            extra.append(f"only {c} reached tol on {p['only_control_reached']} seed(s)")
        if extra:
            s += " Not in the ratio: " + "; ".join(extra) + "."
        lines.append(s)
    return "\n".join(lines) + "\n", agg, paired


def _write_summaries(out: Path, rows, command: str, setup: str, tol: float, first_seed) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "summary.csv", SUMMARY_COLUMNS, rows, _csv_value)
    md, agg, paired = summary_markdown(rows, command, setup, tol, first_seed)
    _write_csv(out / "aggregate.csv", AGGREGATE_COLUMNS, agg, _csv_value)
    _write_csv(out / "paired.csv", PAIRED_COLUMNS, paired, _csv_value)
    (out / "summary.md").write_text(md)


def _write_traces_and_plot(out: Path, s, runs, traces, tol, best, seed, n_seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    shown = sorted(set(best.values()))
    with open(out / "traces.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "optimizer", "kappa", "lr", "iteration", "rel_error"])
        for i in shown:
            r = runs[i]
            for it, e in enumerate(traces[i]):
                w.writerow([seed, r.family, s.kappas[r.kappa_idx], r.lr, it, f"{e:.4e}"])
    colors = {"gd": "C0", "scaled_gd": "C3", "adamw": "C2", "scaled_adamw": "C1"}
    k = len(s.kappas)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.4), sharey=True, squeeze=False)
    for ci, kappa in enumerate(s.kappas):
        ax = axes[0, ci]
        for i in shown:
            r = runs[i]
            if r.kappa_idx != ci:
                continue
            ax.semilogy(traces[i], color=colors[r.family], label=f"{r.family} (lr {r.lr:g})")
        ax.axhline(tol, color="gray", lw=0.8, ls=":")
        ax.set_title(f"κ = {kappa:g}")
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("‖LRᵀ - X*‖_F / ‖X*‖_F")
    fig.suptitle(
        f"matrix sensing n={s.n}, r={s.rank}, m={s.a.shape[0]}: spectral init, float32; "
        f"first seed only (seed {seed} of {n_seeds} instances)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "error_vs_iteration.png", dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # No abbreviations: the removed --seed must not silently mean --seeds.
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--r", type=int, default=10)
    p.add_argument("--m-factor", type=float, default=5.0, help="m = m_factor * n * r")
    p.add_argument("--kappas", type=float, nargs="+", default=[1, 5, 10, 20, 100])
    p.add_argument("--step", type=float, default=0.5, help="GD / scaled GD step size")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--max-iters", type=int, default=6000, help="cap for GD and scaled GD")
    p.add_argument("--adam-lrs", type=float, nargs="*", default=[1e-2, 3e-2, 1e-1])
    p.add_argument("--adam-iters", type=int, default=1000, help="cap for the AdamW sweep")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="one independent problem instance (operator and ground truth) per seed",
    )
    p.add_argument("--out", type=Path, default=Path("results/matrix_sensing"))
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")

    command = command_line("experiments.matrix_sensing", argv)
    m = round(args.m_factor * args.n * args.r)
    setup = (
        f"n = {args.n}, r = {args.r}, m = {m}, κ ∈ {{{', '.join(f'{k:g}' for k in args.kappas)}}}"
        f", float32, spectral initialisation; GD / scaled GD step {args.step:g} (cap "
        f"{args.max_iters}); AdamW / scaled AdamW (weight decay {args.weight_decay:g}, reg 0) at "
        f"lr ∈ {{{', '.join(f'{lr:g}' for lr in args.adam_lrs)}}} (cap {args.adam_iters})"
    )
    t0 = time.perf_counter()
    rows: list[dict] = []
    for seed in args.seeds:
        t_seed = time.perf_counter()
        # One instance at a time: at the default size the operator alone is 1.6 GB.
        s = make_sensing(args.n, args.r, m, args.kappas, seed=seed)
        runs = []
        for k in range(len(s.kappas)):
            runs += [Run(f, args.step, k, args.max_iters) for f in ("gd", "scaled_gd")]
            runs += [
                Run(f, lr, k, args.adam_iters)
                for f in ("adamw", "scaled_adamw")
                for lr in args.adam_lrs
            ]
        traces = run_all(s, runs, tol=args.tol, weight_decay=args.weight_decay, progress=True)
        best = best_lr_runs(runs, traces, args.tol)
        rows += summary_rows(seed, s, runs, traces, args.tol, best)
        if seed == args.seeds[0]:
            _write_traces_and_plot(args.out, s, runs, traces, args.tol, best, seed, len(args.seeds))
        # Rewritten after every seed, so an interrupted long run keeps what it finished.
        _write_summaries(args.out, rows, command, setup, args.tol, args.seeds[0])
        print(
            f"seed {seed}: n={args.n} r={args.r} m={m} tol={args.tol:g}  "
            f"({time.perf_counter() - t_seed:.0f} s)"
        )
        fams = [f for f in FAMILIES if any(r.family == f for r in runs)]
        print(f"{'kappa':>6} " + " ".join(f"{f:>22}" for f in fams))
        for k, kappa in enumerate(s.kappas):
            cells = []
            for f in fams:
                i = best[(f, k)]
                it = iterations_to(traces[i], args.tol)
                val = f">{len(traces[i]) - 1} ({traces[i][-1]:.1e})" if it is None else str(it)
                cells.append(f"{val} @{runs[i].lr:g}")
            print(f"{kappa:>6g} " + " ".join(f"{c:>22}" for c in cells))
        del s, traces  # free this instance's operator before drawing the next
    print(f"{len(args.seeds)} seeds in {time.perf_counter() - t0:.0f} s")
    print((args.out / "summary.md").read_text())
    print(
        f"wrote {args.out}/summary.csv, summary.md, aggregate.csv, paired.csv, traces.csv, "
        "error_vs_iteration.png"
    )


if __name__ == "__main__":
    main()
