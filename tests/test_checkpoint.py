"""Checkpoint and resume: N steps straight == k steps, save, new process, restore, N - k steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from multidevice import run_multidevice
from script_loader import load_script

import rplora_jax

TrainCheckpointer = load_script("examples/checkpointing.py").TrainCheckpointer


def _params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "dense": {
            "lora_a": jax.random.normal(k1, (8, 2)),
            "lora_b": jax.random.normal(k2, (2, 4)) * 0.1,
        }
    }


def _make_train(tx):
    @jax.jit
    def step(params, opt_state, t):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), t), (16, 8))
        loss = lambda p: jnp.mean((x @ p["dense"]["lora_a"] @ p["dense"]["lora_b"] - 1.0) ** 2)
        grads = jax.grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def train(params, opt_state, steps):
        for t in steps:
            params, opt_state = step(params, opt_state, t)
        return params, opt_state

    return train


def test_resume_in_process_is_bit_identical(tmp_path):
    tx = rplora_jax.scaled_adamw(1e-2)
    params = _params()
    train = _make_train(tx)
    straight = train(params, tx.init(params), range(5))
    first = train(params, tx.init(params), range(2))
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(2, *first)
    # Templates only lend shapes, dtypes and shardings: restore over different values.
    other = _params(seed=5)
    with TrainCheckpointer(tmp_path / "ckpt") as ckpt:
        step, p, s = ckpt.restore(other, tx.init(other))
    assert step == 2
    resumed = train(p, s, range(step, 5))
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.dtype == y.dtype


def test_steps_interval_and_retention(tmp_path):
    params = _params()
    opt_state = rplora_jax.scaled_sgd(0.1).init(params)
    with TrainCheckpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
        saved = [ckpt.save(t, params, opt_state) for t in range(5)]
        ckpt.wait_until_finished()
        assert saved == [True, False, True, False, True]
        assert ckpt.all_steps() == [2, 4]
        assert ckpt.latest_step() == 4
        assert ckpt.save(5, params, opt_state, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 5]


def test_restore_errors(tmp_path):
    params = _params()
    opt_state = rplora_jax.scaled_sgd(0.1).init(params)
    with TrainCheckpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="No checkpoint in"):
            ckpt.restore(params, opt_state)
        ckpt.save(3, params, opt_state)
        ckpt.wait_until_finished()
        with pytest.raises(FileNotFoundError, match=r"step 7 .* saved steps: \[3\]"):
            ckpt.restore(params, opt_state, step=7)


@pytest.mark.slow
def test_sharded_resume_in_a_new_process_is_bit_identical(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    saved = run_multidevice("ckpt_save", tmp_path, str(ckpt_dir))
    resumed = run_multidevice("ckpt_resume", tmp_path, str(ckpt_dir))
    assert saved["device_count"] == resumed["device_count"] == 8
    assert resumed["step"] == 3
    # 4 factors, their 2 Adam moments each: 12 leaves sharded over the mesh, all kept.
    assert resumed["n_sharded_leaves"] == 12
    assert resumed["shardings_kept"]
    assert resumed["restored_specs"]["['layer1']['lora_b']"] == "P(None, 'model')"
    # Params and optimizer state equal bit for bit, and the losses after the restart too.
    assert resumed["n_compared"] == 13
    assert resumed["mismatched"] == []
    assert resumed["max_abs_diff"] == 0.0
    assert resumed["losses"] == saved["losses"][3:]
    assert saved["losses"][-1] < saved["losses"][0]


@pytest.mark.slow
def test_restore_onto_eval_shape_templates_stays_on_the_mesh(tmp_path):
    # Templates from jax.eval_shape have no sharding; optax's count, saved from tx.init on one
    # device, came back there and broke the next jitted step ("incompatible devices").
    # On Explicit axes eval_shape gives shardings on an abstract mesh, which orbax cannot use.
    result = run_multidevice("ckpt_eval_shape", tmp_path, str(tmp_path / "ckpt"))
    for kind in ("Auto", "Explicit"):
        assert result[kind]["error"] is None and result[kind]["finite"], kind
        assert result[kind]["n_devices_per_leaf"] == [8], kind


def test_first_step_is_saved_whatever_the_interval(tmp_path):
    params = _params()
    opt_state = rplora_jax.scaled_sgd(0.1).init(params)
    with TrainCheckpointer(tmp_path, save_interval_steps=2) as ckpt:
        assert [ckpt.save(t, params, opt_state) for t in (1, 3, 4, 5)] == [True, False, True, False]
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 4]


def test_example_script_resumes_bit_identically(capsys):
    load_script("examples/checkpointing.py").main()
    assert capsys.readouterr().out.strip() == (
        "restored step 8; 20 straight steps == 8 + save/restore + 12: True"
    )
