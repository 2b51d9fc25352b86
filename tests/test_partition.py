"""Training only the factors: labels, masks, freeze_base (also_train), counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from params_fixture import params_tree

import rplora_jax
from rplora_jax import partition


def test_labels_and_mask():
    labels = partition.lora_labels(params_tree())
    assert labels["q"] == {"kernel": "frozen", "bias": "frozen", "lora_a": "lora", "lora_b": "lora"}
    assert labels["embed"] == "frozen" and labels["stack"]["lora_b"] == "lora"
    assert partition.trainable_mask(params_tree())["stack"] == {
        "kernel": False,
        "lora_a": True,
        "lora_b": True,
    }


def test_freeze_base_equals_optimizer_on_factors_alone():
    params = params_tree()
    params["stack"] = jax.tree.map(lambda x: x.astype(jnp.float32), params["stack"])
    grads = jax.tree.map(lambda x: jnp.cos(3.0 * x), params)
    tx = partition.freeze_base(rplora_jax.scaled_adamw(1e-2))
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
    count = partition.print_trainable_parameters(params_tree())
    lora = 6 * 2 + 2 * 5 + 3 * 4 * 2 * 2
    total = lora + 6 * 5 + 5 + 3 * 16 + 28
    assert count == (lora, total)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {lora:,} || all params: {total:,} || "
        f"trainable%: {100 * lora / total:.4f}"
    )


def test_freeze_base_with_optax_partition_labels_for_nnx_state():
    from flax import nnx

    from rplora_jax.layers.lora_nnx import LoRALinear

    layer = LoRALinear(4, 3, lora=rplora_jax.LoRAConfig(rank=2), rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    labels = jax.tree_util.tree_flatten_with_path(partition.lora_labels(state))[0]
    by_name = {str(path[0].key): label for path, label in labels}
    assert by_name == {"bias": "frozen", "kernel": "frozen", "lora_a": "lora", "lora_b": "lora"}
    tx = partition.freeze_base(optax.sgd(1.0))
    grads = jax.tree.map(jnp.ones_like, state)
    updates, _ = tx.update(grads, tx.init(state), state)
    assert float(jnp.abs(updates["kernel"][...]).max()) == 0.0
    assert float(jnp.abs(updates["lora_a"][...]).min()) == 1.0


def test_also_train_and_its_errors():
    params = params_tree()
    labels = partition.lora_labels(params, also_train=r"embed|q/bias")
    assert labels["embed"] == "lora" and labels["q"]["bias"] == "lora"
    assert labels["q"]["kernel"] == "frozen"
    grads = jax.tree.map(jnp.ones_like, params)
    tx = partition.freeze_base(optax.sgd(0.5), also_train=[r"embed"])
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["embed"], -0.5 * np.ones((7, 4)))
    np.testing.assert_array_equal(updates["q"]["bias"], np.zeros(5))
    with pytest.raises(ValueError, match=r"\['head/.\*'\] match no leaf"):
        partition.lora_labels(params, also_train=[r"embed", r"head/.*"])


def test_import_loads_no_optional_dependency():
    import subprocess
    import sys

    code = (
        "import sys, rplora_jax; "
        "print([m for m in ('flax', 'orbax', 'safetensors', 'tqdm', 'torch', 'peft') "
        "if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_also_train_is_checked_where_it_is_given():
    with pytest.raises(ValueError, match="also_train must be a regex"):
        partition.freeze_base(optax.sgd(0.1), also_train=3)


@pytest.mark.parametrize(
    "make_tx", [lambda: optax.adamw(0.1), lambda: rplora_jax.scaled_adamw(0.1)]
)
def test_freeze_base_without_factors_names_the_tree(make_tx):
    # Factors the rules do not recognise: with adamw every update used to be zero, silently;
    # with scaled_adamw the error listed no path (its branch saw only masked leaves).
    params = {"kernel": jnp.ones((4, 4)), "loraA": jnp.ones((4, 2)), "loraB": jnp.ones((2, 4))}
    tx = rplora_jax.freeze_base(make_tx())
    with pytest.raises(
        ValueError,
        match=r"freeze_base found no LoRA pairs among 3 leaves "
        r"\(first paths: \['kernel', 'loraA', 'loraB'\]\)",
    ):
        tx.init(params)


def test_labels_and_mask_refuse_a_tree_without_pairs():
    # PEFT's names without rules=PEFT: every leaf "frozen" would train nothing, silently.
    params = {"q": {"weight": jnp.ones((4, 4)), "lora_A": {"weight": jnp.ones((2, 4))},
                    "lora_B": {"weight": jnp.zeros((4, 2))}}}  # fmt: skip
    for fn in (partition.lora_labels, partition.trainable_mask):
        with pytest.raises(ValueError, match=rf"{fn.__name__} found no LoRA pairs .*'q/lora_A/"):
            fn(params)
    assert partition.lora_labels(params, rules=rplora_jax.PEFT)["q"]["lora_B"]["weight"] == "lora"
    # No pairs but also_train: something trains, so no error.
    head = partition.lora_labels({"head": jnp.ones(2), "body": jnp.ones(2)}, also_train="head")
    assert head == {"head": "lora", "body": "frozen"}
