"""The Tunix recipe (examples/tunix_peft.py) end to end: qwix LoRA in ``PeftTrainer``.

Needs ``pip install -e ".[tunix]"`` (CI's trainers job); skips without it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from reference import precondition_flax
from script_loader import ROOT, load_script

pytest.importorskip("tunix", reason='pip install -e ".[tunix]"')

from flax import nnx
from tunix.sft import peft_trainer

import rplora_jax

pytestmark = pytest.mark.slow
recipe = load_script("examples/tunix_peft.py")


@pytest.fixture(autouse=True)
def _tunix_promotes_ranks():
    # Tunix's models rely on implicit rank promotion, which conftest makes an error.
    with jax.numpy_rank_promotion("allow"):
        yield


def _lora(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))


def _frozen(model):
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def _pairs(tree):
    """{path of ``<w>_lora_a``: (a, b)} for every qwix pair (``<w>_lora_b`` is its sibling)."""
    flat = {
        tuple(str(k.key) for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
    return {
        key: (leaf, flat[(*key[:-1], key[-1].replace("lora_a", "lora_b"))])
        for key, leaf in flat.items()
        if key[-1].endswith("lora_a")
    }


def _perturbed(model):
    """Adds noise to every factor, so that ``b != 0`` and both factors get gradients."""
    rng = np.random.default_rng(0)
    state = nnx.state(model, nnx.LoRAParam)
    noise = jax.tree.map(lambda v: 0.1 * rng.standard_normal(v.shape).astype(v.dtype), state)
    nnx.update(model, jax.tree.map(lambda v, n: v + n, state, noise))
    return model


def _assert_step(before, after, want, lr, key):
    # The step is read back from float32 parameters: allow their rounding.
    atol = 1e-4 * np.abs(want).max() + 4 * np.spacing(np.abs(before).max()) / lr
    np.testing.assert_allclose((before - after) / lr, want, atol=atol, err_msg=str(key))


@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
def test_one_step_is_the_preconditioned_gradient(qlora):
    """One PeftTrainer step with scaled SGD moves every pair by -lr times NumPy's preconditioned
    gradient."""
    lr = 0.05
    model = _perturbed(recipe.lora_model(qlora=qlora))
    batch = next(recipe.batches(1))
    grad_fn = nnx.grad(peft_trainer._default_loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))
    grads = jax.tree.map(np.asarray, nnx.to_pure_dict(grad_fn(model, **recipe.model_inputs(batch))))
    before = _lora(model)

    recipe.trainer(model, rplora_jax.scaled_sgd(lr), 1).train(iter([batch]))

    after, moved = _pairs(_lora(model)), _pairs(before)
    assert len(moved) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    for key, (a, b) in moved.items():
        g_a, g_b = _pairs(grads)[key]
        want = precondition_flax(g_a, g_b, a, b, rplora_jax.DEFAULT_REG)
        for x, moved_x, want_x in zip((a, b), after[key], want, strict=True):
            _assert_step(x, moved_x, want_x, lr, key)


def test_gradient_accumulation_preconditions_the_averaged_gradient():
    """Two accumulated micro-batches make the step that one batch of both makes: one update, of
    the averaged gradient, preconditioned with that step's factors."""
    lr = 1.0
    x, y = recipe.batches(2)
    both = peft_trainer.TrainingInput(
        input_tokens=np.concatenate([x.input_tokens, y.input_tokens]),
        input_mask=np.concatenate([x.input_mask, y.input_mask]),
    )
    accumulated, joined = _perturbed(recipe.lora_model()), _perturbed(recipe.lora_model())
    before = _pairs(_lora(joined))
    recipe.trainer(accumulated, rplora_jax.scaled_sgd(lr), 1, accumulation=2).train(iter([x, y]))
    recipe.trainer(joined, rplora_jax.scaled_sgd(lr), 1).train(iter([both]))

    got, want = _pairs(_lora(accumulated)), _pairs(_lora(joined))
    for key, factors in before.items():
        for x0, moved, reference in zip(factors, got[key], want[key], strict=True):
            _assert_step(x0, moved, (x0 - reference) / lr, lr, key)


def test_loss_falls_the_base_stays_frozen_and_the_rate_is_logged():
    steps = 40
    model = recipe.lora_model()
    frozen, loss_before = _frozen(model), recipe.held_out_loss(model)
    run = recipe.trainer(model, recipe.optimizer(steps), steps, accumulation=2)
    run.train(recipe.batches(2 * steps))

    assert recipe.held_out_loss(model) < loss_before - 0.8  # 4.17 -> about 3.1
    jax.tree.map(np.testing.assert_array_equal, _frozen(model), frozen)
    logged = run.metrics_logger.get_metric_history("", "learning_rate", "train")
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, steps // 10, steps)
    # Tunix logs the rate the optimizer holds when it writes step i's metrics: step i's or, once
    # step i + 1 has been dispatched (its steps run ahead asynchronously), step i + 1's.
    assert len(logged) == steps and np.isclose(max(logged), 1e-2, rtol=1e-6)
    for i, rate in enumerate(logged):
        assert np.isclose(rate, [schedule(i), schedule(i + 1)], rtol=1e-5).any(), (i, rate)


def test_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 8
    tx = recipe.optimizer(steps)
    straight = recipe.lora_model()
    recipe.trainer(straight, tx, steps, accumulation=2).train(recipe.batches(2 * steps))

    first = recipe.lora_model()
    recipe.trainer(first, tx, steps // 2, accumulation=2, checkpoints=str(tmp_path)).train(
        recipe.batches(2 * steps)
    )
    resumed = recipe.lora_model()  # a fresh process: new model, same directory, same data
    run = recipe.trainer(resumed, tx, steps, accumulation=2, checkpoints=str(tmp_path))
    assert run.train_steps == steps // 2
    run.train(recipe.batches(2 * steps))

    assert not np.allclose(_lora(first)["layers"][0]["attn"]["q_proj"]["w_lora_b"], 0)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
        _lora(resumed),
        _lora(straight),
    )


def test_a_module_path_that_matches_nothing_is_an_error():
    """A typo in qwix's module_path leaves no LoRA: Tunix then optimizes every weight, which plain
    optax does silently; ours refuses."""
    model = recipe.lora_model(targets=".*q_prj")
    assert not jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    recipe.trainer(model, optax.adamw(1e-3), 1)  # plain AdamW: the whole model, no warning
    with pytest.raises(ValueError, match="no LoRA pairs"):
        recipe.trainer(model, recipe.optimizer(10), 1)


def test_the_example_runs_on_an_fsdp_mesh():
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4"
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tunix_peft.py"), "--steps", "10"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "mesh: fsdp=4, tp=1" in out
    before, after = (float(x) for x in re.findall(r"held-out loss .*: (\d+\.\d+)", out))
    assert after < before - 0.1
    assert "resumed at step 5 of 10" in out
    gap = float(re.search(r"logits within (\S+) of", out).group(1))
    assert gap < 1e-5
