"""Cost of the preconditioner: jitted optimizer update, scaled_adamw vs optax.adamw.

Both optimizers update the same LoRA parameters (update + apply_updates, buffers donated). For
each LoRA set this prints the compile time of both updates and the median update time of repeated
steps after warm-up (the two alternate step by step, so that changes in the machine's load hit
both alike), with their ratios measured in this run. The ``compile`` set prints compile times
only, for a growing number of small pairs. Runs on any backend (printed first).

    python benchmarks/update_overhead.py [--repeats 20] [--sets a b compile] [--flatten] [--ab]
        [--successors] [--tuning FIELD=VALUE ...] [--shape PAIRS WIDTH RANK]

``--ab`` adds ``scaled_adamw`` with each choice of form of the preconditioner flipped (see
``FLIPS``), so that one run says whether the backend it runs on would take another form;
``--tuning`` adds it with any field of the preconditioner's ``Tuning`` set (chunk sizes,
thresholds, forms), and ``--shape`` a set of ``PAIRS`` pairs of ``WIDTH x RANK`` factors.
``--successors`` adds ``lora_rite`` and ``reflora_adamw``. Each set's line is followed by the
size of each optimizer's state per parameter element.

Sets (``--sets``, default all):
  a              48 pairs 1024x4 / 4x1024 (GPT-2-medium q,v)
  b              128 pairs 4096x16 / 16x4096 (7B q,k,v,o)
  llama          224 separate pairs of rank 64 (a 7B Llama's q,k,v,o 4096x4096, gate, up
                 4096x11008, down 11008x4096; 32 layers): 0.64 GB per float32 tree (params,
                 grads, each optimizer's copy and Adam moments): 10.6 GB peak RSS on CPU
  llama-stacked  the same factors as 7 stacked pairs of 32 layers
  compile        compile time only, 32 / 128 / 512 separate pairs of 64x4
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

import rplora_jax
from rplora_jax import _grouping, preconditioner

LLAMA = {  # name: (in, out), rank 64
    "q": (4096, 4096),
    "k": (4096, 4096),
    "v": (4096, 4096),
    "o": (4096, 4096),
    "gate": (4096, 11008),
    "up": (4096, 11008),
    "down": (11008, 4096),
}


def _pair(key, shape_a, shape_b, fan_in):
    ka, kb = jax.random.split(key)
    return {
        "lora_a": jax.random.normal(ka, shape_a) / fan_in**0.5,
        "lora_b": jax.random.normal(kb, shape_b) * 0.01,
    }


def make_params(n_pairs: int, width: int, rank: int, seed: int = 0) -> dict:
    keys = jax.random.split(jax.random.key(seed), n_pairs)
    return {
        f"layer_{i}": _pair(keys[i], (width, rank), (rank, width), width) for i in range(n_pairs)
    }


def make_llama(stacked: bool, seed: int = 0, layers: int = 32, rank: int = 64) -> dict:
    keys = iter(jax.random.split(jax.random.key(seed), layers * len(LLAMA)))
    if stacked:
        return {
            name: _pair(next(keys), (layers, d_in, rank), (layers, rank, d_out), d_in)
            for name, (d_in, d_out) in LLAMA.items()
        }
    return {
        f"layer_{i}": {
            name: _pair(next(keys), (d_in, rank), (rank, d_out), d_in)
            for name, (d_in, d_out) in LLAMA.items()
        }
        for i in range(layers)
    }


SETS = {
    "a": ("(a) 48 pairs 1024x4 / 4x1024 (GPT-2-medium q,v)", lambda s: make_params(48, 1024, 4, s)),
    "b": ("(b) 128 pairs 4096x16 / 16x4096 (7B q,k,v,o)", lambda s: make_params(128, 4096, 16, s)),
    "llama": ("(c) 224 pairs r=64, 7B Llama, 32 separate layers", lambda s: make_llama(False, s)),
    "llama-stacked": (
        "(d) 7 pairs r=64, 7B Llama, 32 stacked layers",
        lambda s: make_llama(True, s),
    ),
}


def _shape_set(n: int, width: int, rank: int):
    return lambda seed: make_params(n, width, rank, seed)


def make_step(tx: optax.GradientTransformation):
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def optimizers(
    flatten: bool = False, ab: bool = False, tuning: Sequence[str] = (), successors: bool = False
) -> dict:
    """adamw first: the others' ratios are to it. ``flatten`` adds Adam on one flat vector of all
    the parameters (``optax.flatten``), alone and after the preconditioner: one elementwise
    kernel instead of one per leaf, at the price of copying every leaf in and out of it. ``ab``
    adds :func:`ab_variants`, ``tuning`` :func:`tuned` for each ``FIELD=VALUE``,
    ``successors`` LoRA-RITE and RefLoRA with AdamW."""
    txs = {"adamw": optax.adamw(1e-3), "scaled_adamw": rplora_jax.scaled_adamw(1e-3)}
    if successors:
        txs["lora_rite"] = rplora_jax.lora_rite(1e-3)
        txs["reflora_adamw"] = rplora_jax.reflora_adamw(1e-3)
    if flatten:
        txs["flat_adamw"] = optax.flatten(optax.adamw(1e-3))
        txs["scaled_flat_adamw"] = optax.chain(
            rplora_jax.riemannian_preconditioner(), optax.flatten(optax.adamw(1e-3))
        )
    return txs | (ab_variants() if ab else {}) | {f"scaled_adamw[{t}]": tuned(t) for t in tuning}


# The preconditioner's choices of form (fields of its Tuning), each flipped to its alternative.
FLIPS = {
    "apply": "rank_first_apply",  # large rank-first gradients: matmul, else r multiply-adds
    "grams": "large_grams",  # large factors: a Gram dot each, else one over them stacked
    "inverse": "inverse",  # Gauss-Jordan in XLA ops, else batched Cholesky
}
_OTHER_FORM = {
    "matmul": "unrolled",
    "unrolled": "matmul",
    "separate": "stacked",
    "stacked": "separate",
    "gauss_jordan": "cholesky",
    "cholesky": "gauss_jordan",
}
# On CPU the batched LAPACK Cholesky of jaxlib 0.10 can hang (docs/numerics.md): not flipped.
NO_FLIP = {"cpu": ("inverse",)}


def lowering_platform() -> str:
    """The default backend as ``lax.platform_dependent`` names it: 'cuda' or 'rocm' for 'gpu',
    read from the platform version as jax itself does."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    return "rocm" if "rocm" in jax.devices()[0].client.platform_version.lower() else "cuda"


def flipped(choice: str) -> optax.GradientTransformation:
    """``scaled_adamw`` with the preconditioner's ``choice`` flipped for the default backend."""
    field, tuning = FLIPS[choice], _grouping.DEFAULT
    # The inverse is the one backend-dependent form: Cholesky except on CPU.
    form = getattr(tuning, field) or "cholesky"
    tuning = tuning._replace(**{field: _OTHER_FORM[form]})
    return optax.chain(preconditioner._transformation(tuning=tuning), optax.adamw(1e-3))


def tuned(setting: str) -> optax.GradientTransformation:
    """``scaled_adamw`` with one field of the preconditioner's Tuning set: ``"chunk=16"``."""
    field, _, value = setting.partition("=")
    if field not in _grouping.Tuning._fields:
        raise SystemExit(f"--tuning {setting}: fields are {_grouping.Tuning._fields}")
    tuning = _grouping.DEFAULT._replace(**{field: int(value) if value.isdigit() else value})
    return optax.chain(preconditioner._transformation(tuning=tuning), optax.adamw(1e-3))


def ab_variants() -> dict:
    """``scaled_adamw`` with each choice flipped that may be on this backend."""
    skip = NO_FLIP.get(lowering_platform(), ())
    return {
        f"scaled_adamw[{choice} flipped]": flipped(choice) for choice in FLIPS if choice not in skip
    }


def report(
    title: str, compile_s: dict, step_s: dict | None = None, temp: dict | None = None
) -> str:
    """One line: each optimizer's update and compile time, and its ratio to adamw's; with
    ``temp``, the size of each compiled update's temporary buffers."""
    parts = []
    for what, unit, scale, times in (("update", "ms", 1e3, step_s), ("compile", "s", 1, compile_s)):
        if times is None:
            continue
        base = times["adamw"]
        cells = [f"adamw {base * scale:.2f} {unit}"] + [
            f"{name} {t * scale:.2f} {unit} (ratio {t / base:.2f})"
            for name, t in times.items()
            if name != "adamw"
        ]
        parts.append(f"{what} " + ", ".join(cells))
    if temp:
        parts.append("temp buffers " + ", ".join(f"{n} {b / 1e6:.1f} MB" for n, b in temp.items()))
    return f"{title}: " + "; ".join(parts)


def state_bytes(txs: dict, params) -> str:
    """Each optimizer's state, in bytes per parameter element (float32 parameters: 4 bytes)."""
    n = sum(x.size for x in jax.tree.leaves(params))
    nbytes = lambda tx: sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, params))
    )
    return "state bytes per parameter: " + ", ".join(
        f"{k} {nbytes(tx) / n:.2f}" for k, tx in txs.items()
    )


def temp_bytes(compiled) -> int | None:
    """Bytes of temporary buffers XLA allocates for each run of ``compiled`` (None if the
    backend does not say). On CPU, glibc's malloc maps blocks above 32 MiB (33.55 MB) afresh on
    every call, so a step whose temporaries exceed that pays their page faults on every step."""
    analysis = compiled.memory_analysis()
    return None if analysis is None else analysis.temp_size_in_bytes


def compile_step(tx, params, grads):
    """The compiled step and its compile time (tracing and lowering included). The state is
    described before the clock starts: running ``tx.init`` op by op is no part of compiling, and
    whichever optimizer ran first would pay the ops' one-time setup."""
    state = jax.eval_shape(tx.init, params)
    start = time.perf_counter()
    compiled = make_step(tx).lower(params, state, grads).compile()
    return compiled, time.perf_counter() - start


def time_updates(txs: dict, params, grads, repeats: int) -> tuple[dict, dict, dict]:
    """Compile time, median step time and temporary bytes of each optimizer; steps alternate
    between them."""
    runs, compile_s, temp = {}, {}, {}
    for name, tx in txs.items():
        step, compile_s[name] = compile_step(tx, params, grads)
        temp[name] = temp_bytes(step)
        p = jax.tree.map(jnp.copy, params)
        runs[name] = [step, p, tx.init(p)]
    times: dict[str, list[float]] = {name: [] for name in txs}
    for i in range(repeats + 3):
        for name, run in runs.items():
            step, p, state = run
            start = time.perf_counter()
            p, state = step(p, state, grads)
            jax.block_until_ready(p)
            if i >= 3:  # warm-up: first-touch allocations
                times[name].append(time.perf_counter() - start)
            run[1:] = [p, state]
    runs.clear()
    medians = {name: statistics.median(t) for name, t in times.items()}
    return compile_s, medians, {n: b for n, b in temp.items() if b is not None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sets", nargs="*", choices=[*SETS, "compile"], default=[*SETS, "compile"])
    parser.add_argument(
        "--flatten", action="store_true", help="also time Adam on one flat vector (optax.flatten)"
    )
    parser.add_argument("--ab", action="store_true", help="also time each choice of form flipped")
    parser.add_argument(
        "--successors", action="store_true", help="also time lora_rite and reflora_adamw"
    )
    parser.add_argument(
        "--tuning",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="also time scaled_adamw with each of these preconditioner settings (chunk=16 ...)",
    )
    parser.add_argument(
        "--shape",
        nargs=3,
        type=int,
        action="append",
        default=[],
        metavar=("PAIRS", "WIDTH", "RANK"),
        help="also time PAIRS separate pairs of WIDTH x RANK / RANK x WIDTH (repeatable)",
    )
    args = parser.parse_args()
    for setting in args.tuning:
        tuned(setting)  # a misspelt field fails before anything is timed
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
        f"device(s): {jax.devices()[0].device_kind}"
    )
    shapes = {
        f"shape{n}x{w}x{r}": (f"{n} pairs {w}x{r} / {r}x{w}", _shape_set(n, w, r))
        for n, w, r in args.shape
    }
    for title, make in [SETS[k] for k in args.sets if k in SETS] + list(shapes.values()):
        params, grads = make(0), make(1)
        txs = optimizers(args.flatten, args.ab, args.tuning, args.successors)
        compile_s, step_s, temp = time_updates(txs, params, grads, args.repeats)
        print(report(title, compile_s, step_s, temp), flush=True)
        print(f"  {state_bytes(txs, params)}", flush=True)
        del params, grads
    if "compile" in args.sets:
        for n in (32, 128, 512):
            params = make_params(n, 64, 4)
            txs = optimizers(args.flatten, args.ab, args.tuning, args.successors)
            times = {name: compile_step(tx, params, params)[1] for name, tx in txs.items()}
            print(report(f"compile, {n} pairs of 64x4", times), flush=True)


if __name__ == "__main__":
    main()
