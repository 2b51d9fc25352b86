"""Adapter utilities: labels, freeze_base, counts, merge/unmerge, save/load."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rplora_jax
from rplora_jax import adapters


def _params():
    # numpy draws: no per-op compilation, which dominates small tests on CPU.
    rng = np.random.default_rng(0)

    def normal(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32), dtype=dtype)

    return {
        "q": {
            "kernel": normal(6, 5),
            "bias": jnp.zeros((5,)),
            "lora_a": normal(6, 2),
            "lora_b": normal(2, 5),
        },
        # Stacked layers (nn.scan) with bf16 factors.
        "stack": {
            "kernel": normal(3, 4, 4),
            "lora_a": normal(3, 4, 2, dtype=jnp.bfloat16),
            "lora_b": normal(3, 2, 4, dtype=jnp.bfloat16),
        },
        "embed": jnp.ones((7, 4)),
    }


def test_labels_and_mask():
    labels = adapters.lora_labels(_params())
    assert labels["q"] == {"kernel": "frozen", "bias": "frozen", "lora_a": "lora", "lora_b": "lora"}
    assert labels["embed"] == "frozen" and labels["stack"]["lora_b"] == "lora"
    assert adapters.trainable_mask(_params())["stack"] == {
        "kernel": False,
        "lora_a": True,
        "lora_b": True,
    }


def test_freeze_base_equals_optimizer_on_factors_alone():
    params = _params()
    params["stack"] = jax.tree.map(lambda x: x.astype(jnp.float32), params["stack"])
    grads = jax.tree.map(lambda x: jnp.cos(3.0 * x), params)
    tx = adapters.freeze_base(rplora_jax.scaled_adamw(1e-2))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for path in [("q", "kernel"), ("q", "bias"), ("stack", "kernel"), ("embed",)]:
        leaf = updates
        for key in path:
            leaf = leaf[key]
        assert not np.any(np.asarray(leaf)), path
    only = {n: {f: params[n][f] for f in ("lora_a", "lora_b")} for n in ("q", "stack")}
    g_only = {n: {f: grads[n][f] for f in ("lora_a", "lora_b")} for n in ("q", "stack")}
    ref = rplora_jax.scaled_adamw(1e-2)
    want, _ = jax.jit(ref.update)(g_only, ref.init(only), only)
    for n in only:
        for f in ("lora_a", "lora_b"):
            np.testing.assert_allclose(updates[n][f], want[n][f], rtol=1e-6, atol=1e-8)


def test_counts_and_print(capsys):
    count = adapters.print_trainable_parameters(_params())
    lora = 6 * 2 + 2 * 5 + 3 * 4 * 2 * 2
    total = lora + 6 * 5 + 5 + 3 * 16 + 28
    assert count == (lora, total)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {lora:,} || all params: {total:,} || "
        f"trainable%: {100 * lora / total:.4f}"
    )


def test_merge_unmerge_numbers():
    params = _params()
    merged = adapters.merge(params, scale=0.5)
    assert sorted(merged["q"]) == ["bias", "kernel"] and sorted(merged["stack"]) == ["kernel"]
    q = params["q"]
    np.testing.assert_allclose(
        merged["q"]["kernel"], q["kernel"] + 0.5 * q["lora_a"] @ q["lora_b"], rtol=1e-6
    )
    s = jax.tree.map(lambda x: np.asarray(x, np.float32), params["stack"])
    want = s["kernel"] + 0.5 * np.einsum("lir,lro->lio", s["lora_a"], s["lora_b"])
    np.testing.assert_allclose(merged["stack"]["kernel"], want, rtol=1e-5, atol=1e-6)
    restored = adapters.unmerge(merged, adapters.extract_adapter(params), scale=0.5)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)
    kept = adapters.merge(params, scale=lambda path: 1.0, keep_factors=True)
    assert "lora_a" in kept["q"]


def test_merge_nnx_lora_linear_layout_and_errors():
    params = {
        "layer": {
            "kernel": jnp.zeros((3, 2)),
            "lora": {"lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))},
        }
    }
    np.testing.assert_array_equal(adapters.merge(params)["layer"]["kernel"], np.ones((3, 2)))
    bad = {"kernel": jnp.zeros((3, 3)), "lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 2))}
    with pytest.raises(ValueError, match="'lora_a' has shape"):
        adapters.merge(bad)
    with pytest.raises(ValueError, match="no kernel found"):
        adapters.merge(
            {"w": jnp.ones((3, 3)), "lora_a": jnp.ones((3, 1)), "lora_b": jnp.ones((1, 3))}
        )


def test_save_load_round_trip_bit_exact(tmp_path):
    params = _params()
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
    params = _params()
    adapter = adapters.extract_adapter(params)
    with pytest.raises(ValueError, match=r"Factors without a value: \['stack/lora_a'\]"):
        adapters.apply_adapter(params, {k: v for k, v in adapter.items() if k != "stack/lora_a"})
    wrong = {**adapter, "q/lora_a": jnp.zeros((6, 3))}
    with pytest.raises(ValueError, match="'q/lora_a' is float32\\[6, 3\\] in the adapter"):
        adapters.apply_adapter(params, wrong)
    with pytest.raises(ValueError, match="no LoRA factors"):
        adapters.extract_adapter({"kernel": jnp.ones((2, 2))})


def test_freeze_base_with_optax_partition_labels_for_nnx_state():
    from flax import nnx

    from rplora_jax.nnx import LoRALinear

    layer = LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    labels = jax.tree_util.tree_flatten_with_path(adapters.lora_labels(state))[0]
    by_name = {str(path[0].key): label for path, label in labels}
    assert by_name == {"bias": "frozen", "kernel": "frozen", "lora_a": "lora", "lora_b": "lora"}
    tx = adapters.freeze_base(optax.sgd(1.0))
    grads = jax.tree.map(jnp.ones_like, state)
    updates, _ = tx.update(grads, tx.init(state), state)
    assert float(jnp.abs(updates["kernel"][...]).max()) == 0.0
    assert float(jnp.abs(updates["lora_a"][...]).min()) == 1.0
