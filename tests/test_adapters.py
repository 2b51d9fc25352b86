"""Adapter files: extract, apply, save and load only the factors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from params_fixture import params_tree

from rplora_jax import adapters


def test_save_load_round_trip_bit_exact(tmp_path):
    params = params_tree()
    file = str(tmp_path / "a.safetensors")
    saved = adapters.save_adapter(file, params, metadata={"rank": "2", "targets": "q"})
    assert sorted(saved) == ["q/lora_a", "q/lora_b", "stack/lora_a", "stack/lora_b"]
    loaded = adapters.load_adapter(file)
    assert loaded["stack/lora_a"].dtype == jnp.bfloat16
    for k, v in saved.items():
        assert np.asarray(loaded[k]).tobytes() == np.asarray(v).tobytes()
    meta = adapters.read_adapter_metadata(file)
    assert meta["rank"] == "2" and meta["format"] == "rplora_jax.adapter"
    blank = jax.tree.map(jnp.zeros_like, params)
    restored = adapters.load_adapter(file, into=blank)
    np.testing.assert_array_equal(restored["q"]["lora_b"], params["q"]["lora_b"])
    np.testing.assert_array_equal(restored["q"]["kernel"], blank["q"]["kernel"])


def test_apply_adapter_errors():
    params = params_tree()
    adapter = adapters.extract_adapter(params)
    with pytest.raises(ValueError, match=r"Factors without a value: \['stack/lora_a'\]"):
        adapters.apply_adapter(params, {k: v for k, v in adapter.items() if k != "stack/lora_a"})
    wrong = {**adapter, "q/lora_a": jnp.zeros((6, 3))}
    with pytest.raises(ValueError, match="'q/lora_a' is float32\\[6, 3\\] in the adapter"):
        adapters.apply_adapter(params, wrong)
    with pytest.raises(ValueError, match="no LoRA factors"):
        adapters.extract_adapter({"kernel": jnp.ones((2, 2))})
