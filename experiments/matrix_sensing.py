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

All runs share one sensing operator and are advanced together: the two products with ``A``
(``m x n²``, 1.6 GB at the default size) per iteration are batched over every unfinished run,
which is what makes the default size affordable on a CPU. A run leaves the batch once it reaches
``tol`` or its iteration cap.

    python -m experiments.matrix_sensing               # the paper's setting (2 CPU cores: ~37 min)
    python -m experiments.matrix_sensing --n 60 --r 5  # a quick look (seconds)

Writes ``summary.csv``, ``traces.csv`` and ``error_vs_iteration.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import rplora_jax

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


def _write_outputs(out: Path, s, runs, traces, tol, best, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["optimizer", "kappa", "lr", "iters_to_tol", "iters_run", "final_rel_error", "best_lr"]
        )
        for i, (r, t) in enumerate(zip(runs, traces, strict=True)):
            it = iterations_to(t, tol)
            w.writerow(
                [
                    r.family,
                    s.kappas[r.kappa_idx],
                    r.lr,
                    "" if it is None else it,
                    len(t) - 1,
                    f"{t[-1]:.3e}",
                    int(best[(r.family, r.kappa_idx)] == i),
                ]
            )
    shown = sorted(set(best.values()))
    with open(out / "traces.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "kappa", "lr", "iteration", "rel_error"])
        for i in shown:
            r = runs[i]
            for it, e in enumerate(traces[i]):
                w.writerow([r.family, s.kappas[r.kappa_idx], r.lr, it, f"{e:.4e}"])
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
        f"matrix sensing n={s.n}, r={s.rank}, m={s.a.shape[0]}: spectral init, float32", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out / "error_vs_iteration.png", dpi=120)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results/matrix_sensing"))
    args = p.parse_args(argv)

    m = round(args.m_factor * args.n * args.r)
    t0 = time.perf_counter()
    s = make_sensing(args.n, args.r, m, args.kappas, seed=args.seed)
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
    _write_outputs(args.out, s, runs, traces, args.tol, best, args)
    print(f"n={args.n} r={args.r} m={m} tol={args.tol:g}  ({time.perf_counter() - t0:.0f} s)")
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
    print(f"wrote {args.out}/summary.csv, traces.csv, error_vs_iteration.png")


if __name__ == "__main__":
    main()
