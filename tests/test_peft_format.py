"""Adapters in PEFT's format: the format itself (no torch needed), and the round trip against real
PEFT on the equivalent PyTorch model (skips without ``pip install peft torch``)."""

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("safetensors", reason='pip install "rplora_jax[adapters]"')
pytest.importorskip("flax", reason='pip install "rplora_jax[flax]"')

from flax import linen as nn
from safetensors.numpy import load_file, save_file

import rplora_jax
from rplora_jax.layers.config import LoRAConfig
from rplora_jax.peft_format import (
    default_module_name,
    hf_decoder_names,
    load_peft_adapter,
    peft_config,
    save_peft_adapter,
)

D_IN, D, D_OUT, N_LAYERS = 6, 16, 3, 2


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + jnp.tanh(nn.Dense(D, name="query")(x)) * nn.Dense(D, name="value")(x)


class Model(nn.Module):
    """Flax twin of ``TorchModel``: ``embed``, ``layers_{i}/{query,value}``, ``head``."""

    def setup(self):
        self.embed = nn.Dense(D)
        self.layers = [Block() for _ in range(N_LAYERS)]
        self.head = nn.Dense(D_OUT)

    def __call__(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def torch_names(path):
    """Flax's ``layers_1/query`` is PyTorch's ``layers.1.query``."""
    return re.sub(r"layers_(\d+)", r"layers.\1", default_module_name(path))


X = np.random.default_rng(0).standard_normal((5, D_IN)).astype(np.float32)


def random_factors(variables, seed):
    """The variables with every factor (lora_b included) random, so the adapter matters."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if path[-1].key in ("lora_a", "lora_b"):
            return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(draw, variables)


def lora_model(targets, config, seed=1):
    model = Model()
    base = model.init(jax.random.key(0), X)
    lora = rplora_jax.inject_linen(model, targets, config)
    variables = random_factors(lora.init_from(base, jax.random.key(seed), X), seed)
    return lora, base, variables


# ---------------------------------------------------------------- the format, without torch


def test_keys_shapes_and_config(tmp_path):
    config = LoRAConfig(rank=4, alpha=8.0, dropout_rate=0.1)
    _, _, variables = lora_model(r"layers_\d+/(query|value)", config)
    saved = save_peft_adapter(
        tmp_path, variables, config, module_names=torch_names, base_model_name_or_path="m"
    )
    assert sorted(saved) == sorted(
        f"base_model.model.layers.{i}.{m}.lora_{r}.weight"
        for i in range(N_LAYERS)
        for m in ("query", "value")
        for r in "AB"
    )
    a = variables["params"]["layers_1"]["query"]["lora_a"]
    b = variables["params"]["layers_1"]["query"]["lora_b"]
    on_disk = load_file(str(tmp_path / "adapter_model.safetensors"))
    np.testing.assert_array_equal(on_disk["base_model.model.layers.1.query.lora_A.weight"], a.T)
    np.testing.assert_array_equal(on_disk["base_model.model.layers.1.query.lora_B.weight"], b.T)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["target_modules"] == ["query", "value"] and cfg["use_rslora"] is False
    assert cfg["lora_dropout"] == 0.1 and cfg["base_model_name_or_path"] == "m"
    assert peft_config(tmp_path) == LoRAConfig(rank=4, alpha=8, dropout_rate=0.1)

    blank = jax.tree.map(jnp.zeros_like, variables)
    back = load_peft_adapter(tmp_path, blank, module_names=torch_names, lora=config)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        if x.shape == a.shape or x.shape == b.shape:
            np.testing.assert_array_equal(x, y)


def test_target_modules_full_names_when_suffixes_overreach(tmp_path):
    config = LoRAConfig(rank=2)  # alpha None: scale 1 is lora_alpha = r
    _, _, variables = lora_model(r"layers_1/query", config)
    save_peft_adapter(tmp_path, variables, config, module_names=torch_names)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    # "query" would also select layers.0.query, which has no LoRA here.
    assert cfg["target_modules"] == ["layers.1.query"] and cfg["lora_alpha"] == 2
    save_peft_adapter(tmp_path, variables, config, module_names=torch_names, target_modules="q")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "q"


def test_dict_mapping_bf16_and_torch_layout(tmp_path):
    params = {
        "fc": {
            "kernel": jnp.zeros((4, 3)),
            "lora_a": jnp.ones((4, 2), jnp.bfloat16),
            "lora_b": jnp.full((2, 3), 2.0, jnp.bfloat16),
        }
    }
    saved = save_peft_adapter(tmp_path, params, LoRAConfig(rank=2), module_names={"fc": "model.o"})
    assert saved["base_model.model.model.o.lora_B.weight"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"module_names has no entry for the LoRA module 'fc'"):
        save_peft_adapter(tmp_path, params, LoRAConfig(rank=2), module_names={"x": "y"})
    # A tree in PyTorch layout (PEFT's names) is written as is.
    torch_tree = {
        "o": {"lora_A": {"weight": jnp.ones((2, 4))}, "lora_B": {"weight": jnp.ones((3, 2))}}
    }
    saved = save_peft_adapter(tmp_path, torch_tree, LoRAConfig(rank=2), rules=rplora_jax.PEFT)
    assert saved["base_model.model.o.lora_A.weight"].shape == (2, 4)
    back = load_peft_adapter(tmp_path, torch_tree, rules=rplora_jax.PEFT)
    np.testing.assert_array_equal(
        back["o"]["lora_B"]["weight"], torch_tree["o"]["lora_B"]["weight"]
    )


def test_a_tree_with_peft_prefixed_names_keeps_one_prefix(tmp_path):
    # PEFT's own file, read as a flat dict, and the same as a nested tree: the prefix is PEFT's,
    # so it is not added a second time (PEFT would load no factor and warn only).
    weights = {
        "base_model.model.o.lora_A.weight": jnp.arange(8.0).reshape(2, 4),
        "base_model.model.o.lora_B.weight": jnp.ones((3, 2)),
    }
    a, b = weights["base_model.model.o.lora_A.weight"], weights["base_model.model.o.lora_B.weight"]
    nested = {"base_model": {"model": {"o": {"lora_A": {"weight": a}, "lora_B": {"weight": b}}}}}
    for tree in (weights, nested):
        saved = save_peft_adapter(tmp_path, tree, LoRAConfig(rank=2), rules=rplora_jax.PEFT)
        assert sorted(saved) == sorted(weights)
        back = load_peft_adapter(
            tmp_path, jax.tree.map(jnp.zeros_like, tree), rules=rplora_jax.PEFT
        )
        assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), back, tree))
    assert default_module_name("params/base_model/model/fc") == "fc"
    assert default_module_name("encoder/base_model/model") == "encoder.base_model.model"


def test_loading_finds_the_pairs_once(tmp_path, monkeypatch):
    # load_peft_adapter pairs the parameters once, for the module names and the loading both.
    import rplora_jax.pairing

    config = LoRAConfig(rank=2, alpha=4.0)
    _, _, variables = lora_model(r"layers_\d+/query", config)
    save_peft_adapter(tmp_path, variables, config, module_names=torch_names)
    calls = []
    match = rplora_jax.pairing._match_pairs
    monkeypatch.setattr(
        rplora_jax.pairing, "_match_pairs", lambda *a, **k: calls.append(1) or match(*a, **k)
    )
    load_peft_adapter(tmp_path, variables, module_names=torch_names, lora=config)
    assert len(calls) == 1


def _stacked_decoder(layers=2, d=8, ffn=12, rank=2, seed=0):
    """Stacked LoRA factors named like a Llama port's: layers/<proj>/lora_a, (L, in, r)."""
    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (d, d), "v_proj": (d, d), "gate_proj": (d, ffn), "down_proj": (ffn, d)}
    return {
        "layers": {
            name: {
                "kernel": jnp.zeros((layers, i, o)),
                "lora_a": jnp.asarray(rng.standard_normal((layers, i, rank)), jnp.float32),
                "lora_b": jnp.asarray(rng.standard_normal((layers, rank, o)), jnp.float32),
            }
            for name, (i, o) in shapes.items()
        }
    }


def test_hf_decoder_names_and_the_check_against_the_models_modules(tmp_path):
    tree = _stacked_decoder()
    known = [f"model.layers.{i}.{g}.{p}" for i in range(2) for g, p in
             (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "gate_proj"),
              ("mlp", "down_proj"))]  # fmt: skip
    saved = save_peft_adapter(
        tmp_path, tree, LoRAConfig(rank=2), module_names=hf_decoder_names(), model_modules=known
    )
    assert sorted(saved) == sorted(
        f"base_model.model.{k}.lora_{r}.weight" for k in known for r in "AB"
    )
    np.testing.assert_array_equal(
        saved["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"],
        tree["layers"]["down_proj"]["lora_a"][1].T,
    )
    # Without transformers' "model." prefix PEFT would match nothing: an error with the hint.
    with pytest.raises(
        ValueError, match=r"does not have: \['layers.0.mlp.down_proj', .*prefix 'model.'"
    ):
        save_peft_adapter(
            tmp_path,
            tree,
            LoRAConfig(rank=2),
            module_names=hf_decoder_names(""),
            model_modules=known,
        )
    with pytest.raises(ValueError, match="does not end in a projection name"):
        hf_decoder_names()("layers/query", (0,))


def _with_config(directory, **fields):
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **fields}))


def test_config_fields_are_allowed_one_by_one(tmp_path):
    params = {"fc": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.full((2, 3), 2.0)}}
    save_peft_adapter(tmp_path, params, LoRAConfig(rank=2, alpha=4.0))
    _with_config(tmp_path, r=4)  # factors of rank 2: PEFT's from_pretrained refuses the file
    with pytest.raises(
        ValueError, match=r"'fc/lora_a' has rank 2 but '.*adapter_config\.json' has r = 4; "
    ):
        load_peft_adapter(tmp_path, params)
    _with_config(tmp_path, r=2)
    plain = json.loads((tmp_path / "adapter_config.json").read_text())
    # PiSSA / OLoRA adapters saved unconverted: PEFT re-runs the initialisation on loading and
    # subtracts it from the base weight, which W0 + s * a @ b here would not do.
    for init in ("pissa", "olora", "pissa_niter_4", "corda", "loftq", "mica"):
        _with_config(tmp_path, init_lora_weights=init)
        with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' \(an initialisation"):
            load_peft_adapter(tmp_path, params)
    _with_config(tmp_path, init_lora_weights=True)
    # Options the library does not know (aLoRA applies the adapter only after its invocation
    # tokens; KaSA, QALoRA...) are refused by name; left at PEFT's "off" value they load.
    for field, value in (("alora_invocation_tokens", [5, 7]), ("kasa_config", {"k": 1}),
                         ("use_qalora", True), ("some_future_option", "on")):  # fmt: skip
        _with_config(tmp_path, **{field: value})
        with pytest.raises(ValueError, match=rf"{field}=.*a PEFT option this library does not"):
            peft_config(tmp_path)
        _with_config(tmp_path, **{field: None})
        assert peft_config(tmp_path).scale == 2.0
    # What does not change the computed model loads: an initialisation whose factors the file
    # overwrites, GPT-2's fan_in_fan_out (only W0 is transposed; A and B are not), dropout,
    # layer selection.
    for fields in (
        {"init_lora_weights": "gaussian"},
        {"init_lora_weights": "orthogonal", "fan_in_fan_out": True},
        {"layers_to_transform": [0], "lora_dropout": 0.1, "qalora_group_size": 32},
        {"ensure_weight_tying": True, "task_type": "CAUSAL_LM", "layers_pattern": "layers"},
    ):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**plain, **fields}))
        back = load_peft_adapter(tmp_path, jax.tree.map(jnp.zeros_like, params))
        np.testing.assert_array_equal(back["fc"]["lora_b"], params["fc"]["lora_b"])


def test_nnx_models_stored_scales_are_checked(tmp_path):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

    model = Net(nnx.Rngs(0))
    rplora_jax.inject_nnx(model, "fc1|fc2", LoRAConfig(rank=2, alpha=8.0), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"layers \['fc1', 'fc2'\] have scale \[4.0\], but lora="):
        save_peft_adapter(tmp_path, model, LoRAConfig(rank=2))
    save_peft_adapter(tmp_path, model, LoRAConfig(rank=2, alpha=8.0))
    assert len(load_peft_adapter(tmp_path, model)["fc1"]) >= 2  # same scale: loads
    # An adapter of scale 2 into layers of scale 4: the model itself is checked without lora=.
    _with_config(tmp_path, lora_alpha=4)
    with pytest.raises(ValueError, match=r"have scale \[4.0\], but the adapter \(lora_alpha=4"):
        load_peft_adapter(tmp_path, model)
    # Flax's own nnx.LoRALinear adds x @ a @ b unscaled.
    flax_lora = nnx.Dict(fc=nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\['fc', 'fc/lora'\] have scale \[1.0\], but lora= has"):
        save_peft_adapter(tmp_path, flax_lora, LoRAConfig(rank=2, alpha=16.0))
    save_peft_adapter(tmp_path, flax_lora, LoRAConfig(rank=2))


def test_stacked_pairs_need_a_callable(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "scan": {
                "query": {
                    "kernel": jnp.zeros((3, 5, 4)),
                    "lora_a": jnp.asarray(rng.standard_normal((3, 5, 2)), jnp.float32),
                    "lora_b": jnp.asarray(rng.standard_normal((3, 2, 4)), jnp.float32),
                }
            }
        }
    }
    config = LoRAConfig(rank=2)
    with pytest.raises(ValueError, match=r"'params/scan/query' is stacked: \(3,\) layers"):
        save_peft_adapter(tmp_path, params, config)

    def names(path, index=None):
        return f"layers.{index[0]}.query"

    saved = save_peft_adapter(tmp_path, params, config, module_names=names)
    a = params["params"]["scan"]["query"]["lora_a"]
    np.testing.assert_array_equal(saved["base_model.model.layers.2.query.lora_A.weight"], a[2].T)
    blank = jax.tree.map(jnp.zeros_like, params)
    back = load_peft_adapter(tmp_path, blank, module_names=names)
    np.testing.assert_array_equal(back["params"]["scan"]["query"]["lora_a"], a)


def test_refusals(tmp_path):
    multi = {
        "attn": {
            "kernel": jnp.zeros((4, 2, 3)),
            "lora_a": jnp.zeros((4, 2)),
            "lora_b": jnp.zeros((2, 2, 3)),
        }
    }
    with pytest.raises(
        ValueError, match=r"'attn/lora_a' \(4, 2\) / 'attn/lora_b' \(2, 2, 3\) has "
    ):
        save_peft_adapter(tmp_path, multi, LoRAConfig(rank=2))
    params = {"fc": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
    with pytest.raises(ValueError, match=r"rank 2 but the LoRAConfig's rank is 8"):
        save_peft_adapter(tmp_path, params, LoRAConfig(rank=8))
    two = {"a": params["fc"], "b": params["fc"]}
    with pytest.raises(ValueError, match="both map to the PyTorch module 'x'"):
        save_peft_adapter(tmp_path, two, LoRAConfig(rank=2), module_names=lambda p: "x")

    save_peft_adapter(tmp_path, params, LoRAConfig(rank=2, alpha=4.0))
    _with_config(tmp_path, r=4)  # factors of rank 2: PEFT's from_pretrained refuses the file
    with pytest.raises(
        ValueError, match=r"'fc/lora_a' has rank 2 but '.*adapter_config\.json' has r = 4; "
    ):
        load_peft_adapter(tmp_path, params)
    _with_config(tmp_path, r=2)
    with pytest.raises(ValueError, match=r"has r=2, scale 2.0 .* but lora= has rank 2, scale 1"):
        load_peft_adapter(tmp_path, params, lora=LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"file lacks: \['base_model.model.g.lora_A.weight', "):
        load_peft_adapter(tmp_path, {"g": params["fc"]})
    with pytest.raises(ValueError, match=r"'base_model.model.fc.lora_A.weight' has shape \(2, 4\)"):
        load_peft_adapter(
            tmp_path, {"fc": {"lora_a": jnp.ones((5, 2)), "lora_b": jnp.ones((2, 3))}}
        )
    weights = load_file(str(tmp_path / "adapter_model.safetensors"))
    save_file(
        {**weights, "base_model.model.head.weight": np.ones(2, np.float32)},
        str(tmp_path / "adapter_model.safetensors"),
    )
    with pytest.raises(ValueError, match=r"no LoRA pair in the parameters: \['base_model.model"):
        load_peft_adapter(tmp_path, params)

    cfg_file = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match=r"use_dora=True \(DoRA's magnitude vectors\)"):
        load_peft_adapter(tmp_path, params)
    cfg_file.write_text(json.dumps({**cfg, "rank_pattern": {"fc": 4}}))
    with pytest.raises(ValueError, match="per-module ranks"):
        peft_config(tmp_path)
    cfg_file.write_text(json.dumps(cfg))
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pickled adapter_model\.bin; convert it"):
        load_peft_adapter(tmp_path, params)


# ---------------------------------------------------------------- against real PEFT


@pytest.fixture(scope="module")
def torch_peft():
    torch = pytest.importorskip("torch", reason="pip install peft torch (CPU torch suffices)")
    peft = pytest.importorskip("peft", reason="pip install peft torch (CPU torch suffices)")
    from torch import nn as tnn

    class TorchBlock(tnn.Module):
        def __init__(self):
            super().__init__()
            self.query, self.value = tnn.Linear(D, D), tnn.Linear(D, D)

        def forward(self, x):
            return x + torch.tanh(self.query(x)) * self.value(x)

    class TorchModel(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embed = tnn.Linear(D_IN, D)
            self.layers = tnn.ModuleList([TorchBlock() for _ in range(N_LAYERS)])
            self.head = tnn.Linear(D, D_OUT)

        def forward(self, x):
            x = self.embed(x)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    def twin(base_params):
        """The PyTorch model with the Flax model's weights (weight = kernel.T)."""
        model = TorchModel()
        state = {}
        flat = jax.tree_util.tree_flatten_with_path(base_params["params"])[0]
        for path, leaf in flat:
            keys = [k.key for k in path]
            name = torch_names("/".join(keys[:-1]))
            value = np.asarray(leaf)
            state[f"{name}.weight" if keys[-1] == "kernel" else f"{name}.bias"] = torch.tensor(
                value.T if keys[-1] == "kernel" else value
            )
        model.load_state_dict(state, strict=True)
        return model.eval()

    return torch, peft, twin


def lora_modules(peft_model):
    return sorted(
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and len(m.lora_A)
    )


@pytest.mark.parametrize(
    ("targets", "config"),
    [
        (r"layers_\d+/(query|value)", LoRAConfig(rank=4, alpha=8.0)),
        (r"embed|layers_1/query|head", LoRAConfig(rank=3, alpha=5.0, rslora=True)),
    ],
)
def test_peft_loads_our_adapter(tmp_path, torch_peft, targets, config):
    torch, peft, twin = torch_peft
    lora, base, variables = lora_model(targets, config)
    ours = np.asarray(lora.apply(variables, X))
    save_peft_adapter(tmp_path, variables, config, module_names=torch_names)

    torch_model = twin(base)
    with torch.no_grad():
        np.testing.assert_allclose(
            torch_model(torch.tensor(X)).numpy(), Model().apply(base, X), rtol=1e-5, atol=1e-5
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()], caught
    expected = sorted(
        torch_names(p.a_path.rsplit("/", 1)[0]) for p in rplora_jax.find_lora_pairs(variables)
    )
    assert lora_modules(peft_model) == expected  # target_modules selected exactly these
    with torch.no_grad():
        theirs = peft_model(torch.tensor(X)).numpy()
    assert np.abs(ours - np.asarray(Model().apply(base, X))).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-5)


def test_we_load_peft_adapter(tmp_path, torch_peft):
    torch, peft, twin = torch_peft
    model = Model()
    base = model.init(jax.random.key(0), X)
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(
        twin(base),
        peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["query", "value"]),
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)  # PEFT starts B at zero
        theirs = peft_model.eval()(torch.tensor(X)).numpy()
    peft_model.save_pretrained(str(tmp_path))

    config = peft_config(tmp_path)
    assert config.rank == 4 and config.scale == pytest.approx(6 / 2)
    lora = rplora_jax.inject_linen(model, r"layers_\d+/(query|value)", config)
    blank = lora.init_from(base, jax.random.key(1), X)
    variables = load_peft_adapter(tmp_path, blank, module_names=torch_names, lora=config)
    ours = np.asarray(lora.apply(variables, X))
    assert np.abs(ours - np.asarray(model.apply(base, X))).max() > 1e-2
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_nnx_default_names(tmp_path):
    from flax import nnx

    class NNXBlock(nnx.Module):
        def __init__(self, rngs):
            self.query, self.value = nnx.Linear(4, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)

    class NNXModel(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([NNXBlock(rngs) for _ in range(2)])

    model = NNXModel(nnx.Rngs(0))
    config = LoRAConfig(rank=2, alpha=4.0)
    rplora_jax.inject_nnx(model, r"blocks/\d+/query", config, rngs=nnx.Rngs(1))
    saved = save_peft_adapter(tmp_path, model, config)  # nnx.List indices: ModuleList names
    assert sorted(saved)[:2] == [
        "base_model.model.blocks.0.query.lora_A.weight",
        "base_model.model.blocks.0.query.lora_B.weight",
    ]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["query"]
    state = nnx.state(model, nnx.LoRAParam)
    blank = jax.tree.map(jnp.zeros_like, state)
    nnx.update(model, load_peft_adapter(tmp_path, blank, lora=config))
    np.testing.assert_array_equal(
        model.blocks[1].query.lora_b[...], saved["base_model.model.blocks.1.query.lora_B.weight"].T
    )


def test_hf_decoder_names_load_into_a_transformers_llama(tmp_path, torch_peft):
    # A tiny Llama built from its config (no download): its module names take the adapter, and
    # PEFT applies it (every lora_B of the loaded model equals ours).
    _, peft, _ = torch_peft
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(config)
    tree = _stacked_decoder()
    save_peft_adapter(
        tmp_path, tree, LoRAConfig(rank=2, alpha=4.0), module_names=hf_decoder_names(),
        model_modules=[n for n, _ in llama.named_modules()],
    )  # fmt: skip
    peft_model = peft.PeftModel.from_pretrained(llama, str(tmp_path))
    state = dict(peft_model.named_parameters())
    for name, f in (("q_proj", "self_attn"), ("down_proj", "mlp")):
        got = state[f"base_model.model.model.layers.1.{f}.{name}.lora_B.default.weight"]
        np.testing.assert_allclose(
            got.detach().numpy(), np.asarray(tree["layers"][name]["lora_b"][1]).T
        )
