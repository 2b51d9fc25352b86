"""The update benchmark's optimizers and report, on a tiny tree (its timings are not tested)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from script_loader import load_script

bench = load_script("benchmarks/update_overhead.py")


def test_every_benchmarked_optimizer_takes_the_same_step_as_its_per_leaf_version():
    # The flat candidates must be the same maths as adamw / scaled_adamw, or their ratios mean
    # nothing: optax.flatten only changes the layout of Adam's state.
    params, grads = bench.make_params(3, 8, 2, seed=0), bench.make_params(3, 8, 2, seed=1)
    steps = {}
    for name, tx in bench.optimizers(flatten=True).items():
        step, seconds = bench.compile_step(tx, params, grads)
        assert seconds > 0
        p = jax.tree.map(np.array, params)
        state = tx.init(p)
        for _ in range(3):
            p, state = step(p, state, grads)
        steps[name] = p
    for per_leaf, flat in (("adamw", "flat_adamw"), ("scaled_adamw", "scaled_flat_adamw")):
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
            steps[per_leaf],
            steps[flat],
        )
    moved = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), steps["adamw"], params)
    assert min(jax.tree.leaves(moved)) > 1e-4
    scaled_vs_plain = jax.tree.map(
        lambda x, y: float(np.max(np.abs(x - y))), steps["adamw"], steps["scaled_adamw"]
    )
    assert max(jax.tree.leaves(scaled_vs_plain)) > 1e-5


def test_report_gives_each_ratio_to_adamw():
    line = bench.report(
        "(x) set", {"adamw": 2.0, "scaled_adamw": 3.0}, {"adamw": 0.01, "scaled_adamw": 0.015}
    )
    assert line == (
        "(x) set: update adamw 10.00 ms, scaled_adamw 15.00 ms (ratio 1.50); "
        "compile adamw 2.00 s, scaled_adamw 3.00 s (ratio 1.50)"
    )
    assert bench.report("c", {"adamw": 1.0, "flat_adamw": 0.5}) == (
        "c: compile adamw 1.00 s, flat_adamw 0.50 s (ratio 0.50)"
    )


def test_report_gives_temporary_buffers():
    line = bench.report("t", {"adamw": 1.0}, {"adamw": 0.01}, {"adamw": 0, "scaled": 3.3e6})
    assert line.endswith("; temp buffers adamw 0.0 MB, scaled 3.3 MB")


def test_the_preconditioned_gradients_are_temporary_buffers():
    # What the docs say about page faults on CPU rests on this: adamw updates in place (no
    # temporaries), while the preconditioner's matmul outputs for the b-gradients are temporaries
    # XLA keeps all at once (on CPU, where rank-first gradients take the matmul).
    params, grads = bench.make_params(4, 4096, 4, seed=0), bench.make_params(4, 4096, 4, seed=1)
    temp = {
        name: bench.temp_bytes(bench.compile_step(tx, params, grads)[0])
        for name, tx in bench.optimizers().items()
    }
    b_grads = sum(g["lora_b"].nbytes for g in grads.values())
    assert temp["adamw"] < 1024
    if jax.default_backend() == "cpu":
        assert temp["scaled_adamw"] >= b_grads


def test_ab_variants_take_the_same_step_with_the_choice_flipped():
    # --ab times each backend-dependent form against the chosen one: they must be the same maths,
    # and the flip must reach the compiled program (on CPU the unrolled apply fuses the b-gradients
    # into Adam's kernels, so they are no longer temporaries) and be undone after tracing.
    params, grads = bench.make_params(4, 4096, 4, seed=0), bench.make_params(4, 4096, 4, seed=1)
    txs = {"scaled_adamw": bench.optimizers()["scaled_adamw"]} | bench.ab_variants()
    # lax.platform_dependent refuses 'gpu': the flips name the platform ('cuda', 'rocm').
    assert bench.lowering_platform() in ("cpu", "cuda", "rocm", "tpu")
    assert len(txs) == 1 + len(bench.FLIPS) - len(bench.NO_FLIP.get(bench.lowering_platform(), ()))
    steps, temp, dots = {}, {}, {}
    for name, tx in txs.items():
        step, _ = bench.compile_step(tx, params, grads)
        temp[name] = bench.temp_bytes(step)
        dots[name] = step.as_text().count(" dot(")
        p = jax.tree.map(np.array, params)
        state = tx.init(p)
        for _ in range(2):
            p, state = step(p, state, grads)
        steps[name] = p
    for name in txs:
        jax.tree.map(
            lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
            steps[name],
            steps["scaled_adamw"],
        )
    if jax.default_backend() == "cpu":
        b_grads = sum(g["lora_b"].nbytes for g in grads.values())
        assert temp["scaled_adamw"] >= b_grads
        assert temp["scaled_adamw[apply flipped]"] < b_grads / 4
        # The apply flip drops the matmul of each of the 4 b-gradients; the Grams flip batches
        # the 8 Gram dots (one per factor) into fewer.
        assert dots["scaled_adamw"] - dots["scaled_adamw[apply flipped]"] == len(grads)
        assert dots["scaled_adamw[grams flipped]"] < dots["scaled_adamw"]


def test_tuned_variants_take_the_same_step_and_name_a_bad_field():
    # --tuning times scaled_adamw with one Tuning field set: the same maths, another program.
    params, grads = bench.make_params(3, 8, 2, seed=0), bench.make_params(3, 8, 2, seed=1)
    settings = ["chunk=1", "unroll_min_size=0", "inverse=cholesky"]
    txs = bench.optimizers(tuning=settings)
    assert list(txs) == ["adamw", "scaled_adamw"] + [f"scaled_adamw[{s}]" for s in settings]
    steps = {}
    for name, tx in txs.items():
        step, _ = bench.compile_step(tx, params, grads)
        p = jax.tree.map(np.array, params)
        p, _ = step(p, tx.init(p), grads)
        steps[name] = p
    for name in txs:
        if name != "adamw":
            jax.tree.map(
                lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
                steps[name],
                steps["scaled_adamw"],
            )
    with pytest.raises(SystemExit, match="chunks=2: fields are"):
        bench.tuned("chunks=2")


def test_successors_and_the_state_line():
    params = bench.make_params(2, 8, 2, seed=0)
    txs = bench.optimizers(successors=True)
    assert list(txs) == ["adamw", "scaled_adamw", "lora_rite", "reflora_adamw"]
    line = bench.state_bytes(txs, params)
    # 64 float32 elements. Adam: two moments (512 bytes) and a step count (4): 8.06.
    # LoRA-RITE: a first moment and a basis like the factors (512), a 2 x 2 second moment (64)
    # and an escaped mass (16) for the 4 factors, a count (4): 9.31. RefLoRA adds a count: 8.12.
    assert line == (
        "state bytes per parameter: adamw 8.06, scaled_adamw 8.06, lora_rite 9.31, "
        "reflora_adamw 8.12"
    )


def _run_script(*args: str) -> str:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, *args], cwd=root, capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
def test_sharded_overhead_runs_and_prints_its_ratio():
    out = _run_script(
        "benchmarks/sharded_overhead.py", "--layers", "2", "--width", "64", "--batch", "32",
        "--repeats", "3", "--warmup", "1",
    )  # fmt: skip
    assert "8 cpu devices" in out
    ratio = float(re.search(r"ratio scaled_adamw / adamw: ([0-9.]+)x", out).group(1))
    assert 0.2 < ratio < 20


def test_sharded_overhead_names_a_mesh_that_does_not_fit():
    with pytest.raises(AssertionError, match=r"--mesh 4,2 needs 8 devices, this host has 2"):
        _run_script("benchmarks/sharded_overhead.py", "--cpu-devices", "2")


@pytest.mark.slow
@pytest.mark.data
def test_train_step_overhead_runs_and_prints_its_ratio():
    from experiments.data.datasets import DatasetNotInstalledError
    from experiments.models import bert

    try:
        bert.minilm_dir()
    except DatasetNotInstalledError as err:
        pytest.skip(str(err))
    out = _run_script(
        "-m", "benchmarks.train_step_overhead", "--repeats", "2", "--batch-size", "2",
        "--length", "8", "--settings", "rank8_qv",
    )  # fmt: skip
    ratio = float(re.search(r"ratio ([0-9.]+)", out).group(1))
    assert 0.2 < ratio < 20, out
