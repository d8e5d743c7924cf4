"""PEFT adapter files (jlora.io.peft): format round trips, parity with PyTorch PEFT both ways."""

import json
import os
import re
from pathlib import PurePosixPath

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.nodes import is_adapter_leaf
from jlora.core.paths import flatten_with_paths
from jlora.io import peft as jpeft
from jlora.io.peft import PeftFormatError, default_naming, load_peft, save_peft

KEY = jax.random.key(0)
X = np.asarray(jax.random.normal(jax.random.key(1), (5, 8)), np.float32)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        return nn.Dense(4, name="fc2")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(8, name="fc")(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(name="layers")(x, None)
        return x


class EmbedNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(4, name="fc")(nn.Embed(20, 8, name="emb")(ids))


IDS = np.array([[0, 3, 19, 7], [5, 5, 1, 2]], np.int32)


def _json(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return json.load(f)


def _flat(tree):
    return dict(flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0])


def _randomize(adapted, seed=3):
    """Non-zero B factors (numpy random) and perturbed Trainable leaves, so every part counts."""
    rng = np.random.default_rng(seed)

    def go(leaf):
        if isinstance(leaf, jlora.LoRANode):
            return leaf.with_(b={n: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype) for n, v in leaf.b.items()})
        if isinstance(leaf, jlora.Trainable):
            return jlora.Trainable(leaf.value + jnp.asarray(rng.standard_normal(leaf.shape), leaf.dtype), leaf.path)
        return leaf
    return jax.tree_util.tree_map(go, adapted, is_leaf=is_adapter_leaf)


def _mlp_adapted(spec, seed=3):
    params = MLP().init(KEY, X)
    return params, _randomize(jlora.apply(params, spec, key=jax.random.key(2)), seed)


def _assert_same_nodes(x, y, adapter="default"):
    fx, fy = _flat(x), _flat(y)
    assert fx.keys() == fy.keys()
    for p, a in fx.items():
        b = fy[p]
        assert type(a) is type(b), p
        if isinstance(a, jlora.LoRANode):
            assert a.layout == b.layout, p
            for f in ("a", "b"):
                u, v = getattr(a, f)[adapter], getattr(b, f)[adapter]
                assert u.shape == v.shape and u.dtype == v.dtype, (p, f)
                np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{p} {f}")
            ma, mb = a.meta[adapter], b.meta[adapter]
            assert ma.rank == mb.rank and ma.dropout == mb.dropout, p
            np.testing.assert_allclose(ma.scale, mb.scale, rtol=1e-12)
            np.testing.assert_array_equal(np.asarray(a.base), np.asarray(b.base))
        elif isinstance(a, jlora.Trainable):
            np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=p)


# ---------------------------------------------------------------------------------------------
# the file format (no torch needed)

def test_file_format_round_trip(tmp_path):
    spec = jlora.LoRA(rank=4, alpha=8, targets=["fc1", "fc2"], rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 3},
                      dropout=0.1)
    params, adapted = _mlp_adapted(spec)
    out = save_peft(tmp_path / "ad", adapted, default_naming, base_model_name_or_path="tiny-mlp", task_type=None)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = _json(out)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["rank_pattern"] == {"fc2": 2} and config["alpha_pattern"] == {"fc2": 3}
    assert config["target_modules"] == ["fc1", "fc2"] and config["lora_dropout"] == 0.1
    assert config["base_model_name_or_path"] == "tiny-mlp" and config["use_rslora"] is False
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["modules_to_save"] is None

    from safetensors.numpy import load_file  # the reference reader agrees with ours
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.fc1.lora_A.weight": (4, 8), "base_model.model.fc1.lora_B.weight": (16, 4),
        "base_model.model.fc2.lora_A.weight": (2, 16), "base_model.model.fc2.lora_B.weight": (4, 2)}
    node = _flat(adapted)["params/fc1/kernel"]
    np.testing.assert_array_equal(tensors["base_model.model.fc1.lora_A.weight"], np.asarray(node.a["default"]).T)
    np.testing.assert_array_equal(tensors["base_model.model.fc1.lora_B.weight"], np.asarray(node.b["default"]).T)
    assert all(v.dtype == np.float32 for v in tensors.values())

    restored = load_peft(out, params, default_naming)
    _assert_same_nodes(adapted, restored)
    assert _flat(restored)["params/fc2/kernel"].meta["default"].scale == 1.5
    assert _flat(restored)["params/fc2/kernel"].meta["default"].init == "peft"
    forward = jlora.lift(MLP().apply)
    np.testing.assert_array_equal(np.asarray(forward(restored, X)), np.asarray(forward(adapted, X)))

    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_peft(out, adapted, default_naming)
    save_peft(out, adapted, default_naming, overwrite=True)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temp dirs left behind


def test_bf16_factors_and_second_adapter(tmp_path):
    spec = jlora.LoRA(rank=3, alpha=5, targets=["fc1"], dtype=jnp.bfloat16)
    params, adapted = _mlp_adapted(spec)
    out = save_peft(tmp_path / "bf16", adapted, default_naming)
    with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
        raw = f.read()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert header["base_model.model.fc1.lora_A.weight"]["dtype"] == "BF16"
    assert header["__metadata__"]["format"] == "pt"                      # + jlora's integrity record
    assert set(json.loads(header["__metadata__"]["jlora_sha256"])) == {k for k in header if k != "__metadata__"}
    restored = load_peft(out, params, default_naming)
    _assert_same_nodes(adapted, restored)
    # onto an already adapted tree: a second named adapter on the same node
    both = load_peft(out, adapted, default_naming, adapter="peft")
    node = _flat(both)["params/fc1/kernel"]
    assert set(node.a) == {"default", "peft"} and node.active == ("default", "peft")
    np.testing.assert_array_equal(np.asarray(node.a["peft"]), np.asarray(node.a["default"]))


def test_rslora_spec_and_ambiguous_pattern_keys(tmp_path):
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="fc")(x)

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, name="fc")(x)
            return Inner(name="layers_1")(Inner(name="layers_0")(x))

    x = X
    params = Deep().init(KEY, x)
    # top-level "fc" differs; a bare "fc" key would also match "layers_0.fc" in PEFT's lookup
    spec = jlora.LoRA(rank=4, alpha=6, targets=["fc"], rslora=True, rank_pattern={r"params/fc": 2})
    adapted = _randomize(jlora.apply(params, spec, key=KEY))
    assert {n.meta["default"].rank for n in _flat(adapted).values() if isinstance(n, jlora.LoRANode)} == {2, 4}
    out = save_peft(tmp_path / "rs", adapted, default_naming, spec=spec)
    config = _json(out)
    assert config["use_rslora"] is True and config["lora_alpha"] == 6 and config["r"] in (2, 4)
    keys = list(config["rank_pattern"])
    assert len(keys) == 1 and keys[0].startswith("^")  # anchored, so it cannot catch the other module
    restored = load_peft(out, params, default_naming)
    _assert_same_nodes(adapted, restored)
    # suffix "fc" would also catch the unadapted "fc" and "layers_1.fc": an exact regex instead
    one = _randomize(jlora.apply(params, jlora.LoRA(rank=2, targets=r".*/layers_0/fc/kernel"), key=KEY))
    target = _json(save_peft(tmp_path / "one", one, default_naming))["target_modules"]
    assert isinstance(target, str) and [m for m in ("fc", "layers_0.fc", "layers_1.fc") if re.fullmatch(target, m)] == ["layers_0.fc"]
    _assert_same_nodes(one, load_peft(tmp_path / "one", params, default_naming))


def test_stacked_scan_unstacked_per_layer_and_restacked_bitwise(tmp_path):
    params = Stack().init(KEY, X)
    assert params["params"]["layers"]["fc"]["kernel"].shape == (3, 8, 8)
    spec = jlora.LoRA(rank=2, alpha=4, targets=r".*/fc/kernel", axes={r".*/fc/kernel": jlora.Axes(stack=1, inputs=1)})
    adapted = _randomize(jlora.apply(params, spec, key=KEY))
    naming = lambda path, layer: f"layers.{layer}.fc"  # noqa: E731
    out = save_peft(tmp_path / "stack", adapted, naming)
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert sorted(tensors) == [f"base_model.model.layers.{i}.fc.lora_{p}.weight" for i in range(3) for p in "AB"]
    node = _flat(adapted)["params/layers/fc/kernel"]
    for i in range(3):
        np.testing.assert_array_equal(tensors[f"base_model.model.layers.{i}.fc.lora_A.weight"], np.asarray(node.a["default"][i]).T)
    assert _json(out)["target_modules"] == ["fc"]

    # layouts from the traced model, or read off the file's shapes
    for kwargs in ({"model": Stack().apply, "example": (X,)}, {}):
        restored = load_peft(out, params, naming, **kwargs)
        _assert_same_nodes(adapted, restored)
        assert _flat(restored)["params/layers/fc/kernel"].layout == jlora.Layout(1, 1, 1)
    assert default_naming("params/layers/fc/kernel", 2) == "layers.2.fc"

    # layers with different ranks / scales (rank_pattern, alpha_pattern) restack exactly:
    # rank zero-padded to the largest, scale folded into b
    rng = np.random.default_rng(0)
    ranks, tensors = [2, 1, 2], {}
    for i, r in enumerate(ranks):
        tensors[f"base_model.model.layers.{i}.fc.lora_A.weight"] = rng.standard_normal((r, 8)).astype(np.float32)
        tensors[f"base_model.model.layers.{i}.fc.lora_B.weight"] = rng.standard_normal((8, r)).astype(np.float32)
    config = dict(_json(out), rank_pattern={"layers.1.fc": 1}, alpha_pattern={"layers.2.fc": 8})
    mixed = load_peft(_write_adapter(tmp_path / "mixed", config, tensors), params, naming)
    node = _flat(mixed)["params/layers/fc/kernel"]
    assert node.meta["default"].rank == 2 and node.a["default"].shape == (3, 8, 2)
    delta = np.asarray(node.delta())
    for i, (r, alpha) in enumerate(zip(ranks, [4, 4, 8])):
        a, b = tensors[f"base_model.model.layers.{i}.fc.lora_A.weight"], tensors[f"base_model.model.layers.{i}.fc.lora_B.weight"]
        np.testing.assert_allclose(delta[i], (alpha / r) * (b @ a).T, rtol=1e-5, atol=1e-5)


def test_embedding_lora_round_trip(tmp_path):
    params = EmbedNet().init(KEY, IDS)
    adapted = _randomize(jlora.apply(params, jlora.LoRA(rank=2, alpha=2, targets=["emb", "fc"]), key=KEY))
    out = save_peft(tmp_path / "emb", adapted, default_naming)
    from safetensors.numpy import load_file
    shapes = {k: v.shape for k, v in load_file(os.path.join(out, "adapter_model.safetensors")).items()}
    assert shapes["base_model.model.emb.lora_embedding_A"] == (2, 20)
    assert shapes["base_model.model.emb.lora_embedding_B"] == (8, 2)
    _assert_same_nodes(adapted, load_peft(out, params, default_naming))


# ---------------------------------------------------------------------------------------------
# errors

def _write_adapter(d, config, tensors):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    jpeft._write_safetensors(os.path.join(d, "adapter_model.safetensors"), tensors, {"format": "pt"})
    return d


def test_errors(tmp_path):
    spec = jlora.LoRA(rank=4, alpha=8, targets=["fc1", "fc2"])
    params, adapted = _mlp_adapted(spec)
    out = save_peft(tmp_path / "ok", adapted, default_naming)
    config = _json(out)
    tensors = jpeft._read_safetensors(os.path.join(out, "adapter_model.safetensors"))

    # a module no kernel maps to (naming mismatch), named in the error
    with pytest.raises(PeftFormatError, match=r"module 'fc1'.*matches no kernel"):
        load_peft(out, params, lambda p, l: "model." + default_naming(p, l))
    # shape mismatch: expected vs found
    bad = dict(tensors, **{"base_model.model.fc1.lora_A.weight": np.zeros((4, 7), np.float32)})
    with pytest.raises(PeftFormatError, match=r"shape mismatch for module 'fc1'.*expected lora_A \(r, 8\).*found \(4, 7\)"):
        load_peft(_write_adapter(tmp_path / "shape", config, bad), params, default_naming)
    # unknown peft_type / unsupported variants
    with pytest.raises(PeftFormatError, match="unsupported peft_type 'LOHA'"):
        load_peft(_write_adapter(tmp_path / "loha", dict(config, peft_type="LOHA"), tensors), params, default_naming)
    with pytest.raises(PeftFormatError, match="DoRA"):
        load_peft(_write_adapter(tmp_path / "dora", dict(config, use_dora=True), tensors), params, default_naming)
    # config rank disagrees with the weights
    with pytest.raises(PeftFormatError, match="rank 4 in the weights but the config says r=2"):
        load_peft(_write_adapter(tmp_path / "rank", dict(config, r=2), tensors), params, default_naming)
    # a lone lora_A
    lone = {k: v for k, v in tensors.items() if k != "base_model.model.fc2.lora_B.weight"}
    with pytest.raises(PeftFormatError, match="'fc2' has lora_A but no lora_B"):
        load_peft(_write_adapter(tmp_path / "lone", config, lone), params, default_naming)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft(tmp_path / "nothing", params, default_naming)

    # save side: stack > 1, a non-LoRA node, an unknown adapter name, plain params
    node = _flat(adapted)["params/fc1/kernel"]
    two_stacks = node.with_(base=jnp.zeros((2, 3, 8, 16)), a={"default": jnp.zeros((2, 3, 8, 4))},
                            b={"default": jnp.zeros((2, 3, 4, 16))}, layout=jlora.Layout(2, 1, 1))
    with pytest.raises(ValueError, match="2 stacked axes"):
        save_peft(tmp_path / "s2", {"params": {"fc1": {"kernel": two_stacks}}}, default_naming)
    other = node.with_(adapters=(("default", jlora.AdapterMeta(method="ia3", rank=4, scale=1.0)),))
    with pytest.raises(ValueError, match="'ia3' adapter"):
        save_peft(tmp_path / "ia3s", {"params": {"fc1": {"kernel": other}}}, default_naming)
    with pytest.raises(ValueError, match="no LoRA node carries an adapter named 'nope'"):
        save_peft(tmp_path / "nope", adapted, default_naming, adapter="nope")
    with pytest.raises(ValueError, match="plain params"):
        save_peft(tmp_path / "plain", params, default_naming)
    with pytest.raises(ValueError, match="only has modules_to_save"):
        save_peft(tmp_path / "mts", jlora.mark_trainable(params, r".*/fc2/bias"), default_naming)
    pissa = jlora.apply(params, jlora.LoRA(rank=2, targets=["fc1"], init="pissa"), key=KEY)
    with pytest.raises(ValueError, match="residual"):
        save_peft(tmp_path / "pissa", pissa, default_naming)
    assert not os.path.exists(tmp_path / "s2") and not os.path.exists(tmp_path / "pissa")


# ---------------------------------------------------------------------------------------------
# parity with PyTorch PEFT

def _torch_mlp(params):
    torch = pytest.importorskip("torch")

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16)
            self.fc2 = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    model = TorchMLP()
    _copy_dense(model, params["params"])
    return model.eval()


def _copy_dense(model, tree, prefix=""):
    import torch

    state = {}
    for name, sub in tree.items():
        if "kernel" in sub:
            state[f"{prefix}{name}.weight"] = torch.from_numpy(np.asarray(sub["kernel"]).T.copy())
            state[f"{prefix}{name}.bias"] = torch.from_numpy(np.asarray(sub["bias"]).copy())
    model.load_state_dict(state, strict=False)


def _torch_out(model, x):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.array(x, np.float32))).numpy()


@pytest.mark.parametrize("case", ["plain", "rslora_rank_pattern", "train_also_bias", "train_also_kernel"])
def test_export_loads_in_peft_with_equal_logits(tmp_path, case):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    spec = {
        "plain": jlora.LoRA(rank=4, alpha=8, targets=["fc1", "fc2"]),
        "rslora_rank_pattern": jlora.LoRA(rank=4, alpha=6, targets=["fc1", "fc2"], rslora=True,
                                          rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 5}),
        "train_also_bias": jlora.LoRA(rank=4, alpha=8, targets=["fc1"], train_also=r".*/fc2/bias"),
        "train_also_kernel": jlora.LoRA(rank=3, alpha=4, targets=["fc1"], train_also=r".*/fc2/(kernel|bias)"),
    }[case]
    params, adapted = _mlp_adapted(spec)
    out = save_peft(tmp_path / case, adapted, default_naming, spec=spec)
    model = peft.PeftModel.from_pretrained(_torch_mlp(params), out).eval()
    expected = np.asarray(jlora.lift(MLP().apply)(adapted, X))
    got = _torch_out(model, X)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(expected - np.asarray(MLP().apply(params, X))).max() > 1e-2  # the adapter matters
    if case.startswith("train_also"):
        assert _json(out)["modules_to_save"] == ["fc2"]
        # and back: the module's weight and bias come back as Trainable leaves
        restored = load_peft(out, params, default_naming)
        assert isinstance(_flat(restored)["params/fc2/bias"], jlora.Trainable)
        np.testing.assert_array_equal(np.asarray(_flat(restored)["params/fc2/bias"].value),
                                      np.asarray(_flat(adapted)["params/fc2/bias"].value))
        np.testing.assert_allclose(np.asarray(jlora.lift(MLP().apply)(restored, X)), expected, atol=1e-6)


@pytest.mark.parametrize("case", ["plain", "rslora_rank_pattern", "modules_to_save"])
def test_peft_made_adapter_loads_with_equal_logits(tmp_path, case):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    params = MLP().init(KEY, X)
    torch.manual_seed(0)
    kwargs = {
        "plain": dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]),
        "rslora_rank_pattern": dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], use_rslora=True,
                                    rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3}),
        "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["fc1"], modules_to_save=["fc2"]),
    }[case]
    model = peft.get_peft_model(_torch_mlp(params), peft.LoraConfig(init_lora_weights=False, **kwargs))
    if case == "modules_to_save":
        with torch.no_grad():
            for p in model.base_model.model.fc2.modules_to_save["default"].parameters():
                p.add_(torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(tmp_path / case))
    expected = _torch_out(model, X)
    adapted = load_peft(tmp_path / case, params, default_naming)
    got = np.asarray(jlora.lift(MLP().apply)(adapted, X))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(got - np.asarray(MLP().apply(params, X))).max() > 1e-2
    node = _flat(adapted)["params/fc1/kernel"]
    lora_a = model.base_model.model.fc1.lora_A["default"].weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(node.a["default"]), lora_a.T)
    if case == "rslora_rank_pattern":
        assert node.meta["default"].scale == pytest.approx(3 / 2)
        assert _flat(adapted)["params/fc2/kernel"].meta["default"].rank == 2
    if case == "modules_to_save":
        assert isinstance(_flat(adapted)["params/fc2/kernel"], jlora.Trainable)


def test_stacked_export_matches_peft_per_layer_modules(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    params = Stack().init(KEY, X)
    spec = jlora.LoRA(rank=2, alpha=4, targets=r".*/fc/kernel")
    adapted = _randomize(jlora.apply(params, spec, key=KEY, model=Stack().apply, example=(X,)))
    out = save_peft(tmp_path / "stack", adapted, lambda path, layer: f"layers.{layer}.fc")

    class TorchStack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8)}) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer["fc"](x))
            return x

    model = TorchStack()
    fc = params["params"]["layers"]["fc"]
    state = {}
    for i in range(3):
        state[f"layers.{i}.fc.weight"] = torch.from_numpy(np.asarray(fc["kernel"][i]).T.copy())
        state[f"layers.{i}.fc.bias"] = torch.from_numpy(np.asarray(fc["bias"][i]).copy())
    model.load_state_dict(state)
    model = peft.PeftModel.from_pretrained(model.eval(), out).eval()
    np.testing.assert_allclose(_torch_out(model, X), np.asarray(jlora.lift(Stack().apply)(adapted, X)), atol=1e-5, rtol=0)


def test_embedding_lora_parity(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    params = EmbedNet().init(KEY, IDS)

    class TorchEmbedNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, ids):
            return self.fc(self.emb(ids))

    def fresh():
        model = TorchEmbedNet()
        p = params["params"]
        model.load_state_dict({"emb.weight": torch.from_numpy(np.asarray(p["emb"]["embedding"]).copy()),
                               "fc.weight": torch.from_numpy(np.asarray(p["fc"]["kernel"]).T.copy()),
                               "fc.bias": torch.from_numpy(np.asarray(p["fc"]["bias"]).copy())})
        return model.eval()

    def run(model):
        with torch.no_grad():
            return model(torch.from_numpy(IDS).long()).numpy()

    forward = jlora.lift(EmbedNet().apply)
    # PEFT -> jlora
    torch.manual_seed(1)
    made = peft.get_peft_model(fresh(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["emb", "fc"],
                                                        init_lora_weights=False)).eval()
    made.save_pretrained(str(tmp_path / "made"))
    np.testing.assert_allclose(np.asarray(forward(load_peft(tmp_path / "made", params, default_naming), IDS)),
                               run(made), atol=1e-5, rtol=0)
    # jlora -> PEFT
    adapted = _randomize(jlora.apply(params, jlora.LoRA(rank=2, alpha=2, targets=["emb", "fc"]), key=KEY))
    adapted = jax.tree_util.tree_map(  # embedding LoRA starts with A = 0: make it count
        lambda l: l.with_(a={"default": l.a["default"] + 0.5}) if isinstance(l, jlora.LoRANode) else l,
        adapted, is_leaf=is_adapter_leaf)
    out = save_peft(tmp_path / "ours", adapted, default_naming)
    loaded = peft.PeftModel.from_pretrained(fresh(), out).eval()
    np.testing.assert_allclose(run(loaded), np.asarray(forward(adapted, IDS)), atol=1e-5, rtol=0)


def test_minilm_bert_parity_both_ways(tmp_path):
    """Real all-MiniLM-L6-v2: jlora BertModel vs transformers BertModel + PEFT (query, value)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import functools

    from jlora import assets
    from jlora.models import bert

    directory = assets.path("minilm", "model")  # installed on demand; a failure here must fail

    model, params, tok = bert.load_pretrained(directory)
    batch = bert.encode(tok, ["A man is eating food.", "The girl is playing a guitar in the park."])
    naming = functools.partial(bert.hf_module_name, prefix="")  # a bare transformers BertModel
    forward = jlora.lift(model.apply)

    def ours(adapted):
        return np.asarray(forward(adapted, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])[0])

    def theirs(m):
        with torch.no_grad():
            out = m(input_ids=torch.from_numpy(np.asarray(batch["input_ids"])).long(),
                    attention_mask=torch.from_numpy(np.asarray(batch["attention_mask"])).long(),
                    token_type_ids=torch.from_numpy(np.asarray(batch["token_type_ids"])).long())
        return out.last_hidden_state.numpy()

    def hf_model():
        return transformers.BertModel.from_pretrained(str(directory)).eval()

    # jlora -> PEFT
    spec = jlora.LoRA(rank=4, alpha=8, targets=["query", "value"])
    adapted = _randomize(jlora.apply(params, spec, key=KEY))
    out = save_peft(tmp_path / "ours", adapted, naming, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    assert _json(out)["target_modules"] == ["query", "value"]
    expected = ours(adapted)
    np.testing.assert_allclose(theirs(peft.PeftModel.from_pretrained(hf_model(), out).eval()), expected, atol=1e-4, rtol=0)
    assert np.abs(expected - ours(params)).max() > 1e-2

    # PEFT -> jlora
    torch.manual_seed(0)
    made = peft.get_peft_model(hf_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           init_lora_weights=False)).eval()
    made.save_pretrained(str(tmp_path / "made"))
    np.testing.assert_allclose(ours(load_peft(tmp_path / "made", params, naming)), theirs(made), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# provenance: base_model_name_or_path / revision in adapter_config.json

def test_base_model_and_revision_written_for_every_file_kind(tmp_path):
    params, lora = _mlp_adapted(jlora.LoRA(rank=2, targets=["fc1"]))
    ia3 = jlora.apply(params, jlora.IA3(targets=["fc1"], feedforward=["fc1"]))
    ada = jlora.apply(params, jlora.AdaLoRA(init_r=2, target_r=1, total_steps=5, targets=["fc1"]), key=KEY)
    prompt = jlora.apply_prompt(params, jlora.PromptTuning(3), KEY,
                                config={"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2})
    for name, tree, kw in [("lora", lora, {}), ("ia3", ia3, {}), ("adalora", ada, {}),
                           ("prompt", prompt, {"task_type": "FEATURE_EXTRACTION"})]:
        out = save_peft(tmp_path / name, tree, default_naming, base_model_name_or_path="org/tiny-mlp",
                        revision="v1.0", **kw)
        config = _json(out)
        assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny-mlp", "v1.0"), name
        assert config["peft_type"] == {"lora": "LORA", "ia3": "IA3", "adalora": "ADALORA",
                                       "prompt": "PROMPT_TUNING"}[name]
    # the default stays null (PEFT's own default) and the file still loads
    config = _json(save_peft(tmp_path / "default", lora, default_naming))
    assert config["base_model_name_or_path"] is None and config["revision"] is None
    _assert_same_nodes(lora, load_peft(tmp_path / "default", params, default_naming))


@pytest.mark.parametrize("argument,value", [
    ("base_model_name_or_path", ""), ("base_model_name_or_path", "  "), ("base_model_name_or_path", 3),
    ("base_model_name_or_path", PurePosixPath("/m")), ("revision", ""), ("revision", b"main")])
def test_bad_base_model_or_revision_raises_before_writing(tmp_path, argument, value):
    _, adapted = _mlp_adapted(jlora.LoRA(rank=2, targets=["fc1"]))
    with pytest.raises(ValueError, match=rf"save_peft: {argument} must be None or a non-empty str.*got "
                                         rf"{re.escape(repr(value))}"):
        save_peft(tmp_path / "bad", adapted, default_naming, **{argument: value})
    assert not os.path.exists(tmp_path / "bad")


def test_export_of_transformers_written_bert_names_its_base(tmp_path, monkeypatch):
    """A tiny BERT written by transformers, adapted in jlora and exported with its directory as
    base_model_name_or_path: PeftConfig reads it back and AutoPeftModel loads base + adapter from
    the export alone, with jlora's outputs."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import functools

    from jlora.models import bert

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")     # AutoPeftModel probes the hub for a tokenizer otherwise
    base_dir = tmp_path / "tiny-bert"
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32)).save_pretrained(str(base_dir))
    cfg = bert.BertConfig.from_hf(base_dir)
    params = bert.load_hf_params(base_dir, cfg)
    adapted = _randomize(jlora.apply(params, jlora.LoRA(rank=2, alpha=4, targets=["query", "value"]), key=KEY))
    naming = functools.partial(bert.hf_module_name, prefix="")      # a bare transformers BertModel
    out = save_peft(tmp_path / "export", adapted, naming, task_type="FEATURE_EXTRACTION",
                    base_model_name_or_path=str(base_dir), revision="main")

    config = peft.PeftConfig.from_pretrained(out)
    assert config.base_model_name_or_path == str(base_dir) and config.revision == "main"

    loaded = peft.AutoPeftModelForFeatureExtraction.from_pretrained(out).eval()
    ids = np.array([[2, 7, 9, 3], [4, 5, 1, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32)
    with torch.no_grad():
        theirs = loaded(input_ids=torch.from_numpy(ids).long(),
                        attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    model = bert.BertModel(cfg)
    ours = np.asarray(jlora.lift(model.apply)(adapted, ids, mask)[0])
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    assert np.abs(ours - np.asarray(model.apply(params, ids, mask)[0])).max() > 1e-2   # the adapter counts


@pytest.mark.parametrize("edit,match", [
    ({"target_modules": ["fc1"]}, r"target_modules=\['fc1'\] leave out 1 module\(s\) that have weights in the file: \['fc2'\]"),
    ({"target_modules": "fc1"}, r"leave out 1 module\(s\).*\['fc2'\]"),
    ({"r": "4"}, r"r must be a positive integer, got '4'"),
    ({"r": 0}, r"r must be a positive integer, got 0"),
    ({"lora_alpha": "8"}, r"lora_alpha must be a finite number, got '8'"),
    ({"lora_alpha": float("nan")}, r"lora_alpha must be a finite number"),
    ({"use_rslora": "true"}, r"use_rslora must be true or false, got 'true'"),
    ({"rank_pattern": ["fc2"]}, r"rank_pattern must be a mapping"),
    ({"r": 3}, r"module 'fc1' has rank 4 in the weights but the config says r=3"),
])
def test_an_edited_config_that_disagrees_with_the_weights_is_refused(tmp_path, edit, match):
    """Config checks as they apply to any PEFT file (here with jlora's integrity record removed, as in
    a file PEFT wrote); a file jlora wrote also refuses any edit of these fields by its record."""
    from safetensors.numpy import load_file, save_file

    params, adapted = _mlp_adapted(jlora.LoRA(rank=4, alpha=8, targets=["fc1", "fc2"]))
    out = save_peft(tmp_path / "ad", adapted, default_naming)
    config = _json(out)
    config.update(edit)
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    if "r must" not in match and "must be" not in match:
        with pytest.raises(PeftFormatError, match="was edited after jlora wrote it"):
            load_peft(out, params, default_naming)
    weights = os.path.join(out, "adapter_model.safetensors")
    save_file(load_file(weights), weights, metadata={"format": "pt"})      # no jlora record: a PEFT-made file
    with pytest.raises(PeftFormatError, match=match):
        load_peft(out, params, default_naming)
    config.update({"target_modules": "all-linear", "r": 4, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {}})
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    load_peft(out, params, default_naming)        # all-linear covers every module: loads


def test_layers_to_transform_must_cover_the_weights(tmp_path):
    params = Stack().init(KEY, X)
    spec = jlora.LoRA(rank=2, targets=r".*/fc/kernel", axes={r".*/fc/kernel": jlora.Axes(stack=1, inputs=1)})
    adapted = _randomize(jlora.apply(params, spec, key=KEY))
    naming = lambda path, layer: f"layers.{layer}.fc"  # noqa: E731
    out = save_peft(tmp_path / "ad", adapted, naming)
    from safetensors.numpy import load_file, save_file
    weights = os.path.join(out, "adapter_model.safetensors")
    save_file(load_file(weights), weights, metadata={"format": "pt"})      # no jlora record: a PEFT-made file
    config = _json(out)
    config.update({"target_modules": ["fc"], "layers_to_transform": [0, 1]})
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(PeftFormatError, match=r"layers_to_transform=\[0, 1\] leave out 1 module\(s\).*layers.2.fc"):
        load_peft(out, params, naming)
    config["layers_to_transform"] = [0, 1, 2]
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    from safetensors.numpy import load_file, save_file
    weights = os.path.join(out, "adapter_model.safetensors")
    save_file(load_file(weights), weights, metadata={"format": "pt"})      # no jlora record: a PEFT-made file
    load_peft(out, params, naming)


def test_lora_with_a_trained_bias_is_written_as_bias_lora_only(tmp_path):
    """A LoRA module whose bias trains too: PEFT's bias="lora_only" layout (<module>.base_layer.bias),
    loaded by PEFT with the same outputs and by load_peft as a Trainable bias."""
    peft = pytest.importorskip("peft")
    spec = jlora.LoRA(rank=4, alpha=8, targets=["fc1", "fc2"], train_also=r".*/fc1/bias")
    params, adapted = _mlp_adapted(spec)
    out = save_peft(tmp_path / "ad", adapted, default_naming, spec=spec)
    config = _json(out)
    assert config["bias"] == "lora_only" and config["modules_to_save"] is None
    from safetensors.numpy import load_file
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    np.testing.assert_array_equal(tensors["base_model.model.fc1.base_layer.bias"],
                                  np.asarray(_flat(adapted)["params/fc1/bias"].value))
    expected = np.asarray(jlora.lift(MLP().apply)(adapted, X))
    model = peft.PeftModel.from_pretrained(_torch_mlp(params), out).eval()
    np.testing.assert_allclose(_torch_out(model, X), expected, atol=1e-5, rtol=0)
    restored = load_peft(out, params, default_naming)
    assert isinstance(_flat(restored)["params/fc1/bias"], jlora.Trainable)
    np.testing.assert_allclose(np.asarray(jlora.lift(MLP().apply)(restored, X)), expected, atol=1e-6)


def test_combined_rslora_adapters_differ_from_peft_by_exactly_sqrt_of_the_new_rank(tmp_path):
    """PEFT's add_weighted_adapter gives the new adapter lora_alpha = r_new and inherits use_rslora
    from the first source, so a combination of rsLoRA adapters is scaled by r_new / sqrt(r_new) =
    sqrt(r_new) instead of 1. jlora.combine_adapters keeps the weighted sum itself (scale 1); the
    README states the factor. Same factors, so the deltas differ by exactly sqrt(r_new)."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    params = MLP().init(KEY, X)
    spec = jlora.LoRA(rank=4, alpha=8, targets=["fc1", "fc2"], rslora=True)
    adapted = _randomize(jlora.apply(params, spec, key=jax.random.key(2), name="a"), seed=1)
    adapted = _randomize(jlora.apply(adapted, spec, key=jax.random.key(3), name="b"), seed=2)
    for n in ("a", "b"):
        save_peft(tmp_path / n, adapted, default_naming, adapter=n, spec=spec)
    model = peft.PeftModel.from_pretrained(_torch_mlp(params), tmp_path / "a", adapter_name="a")
    model.load_adapter(str(tmp_path / "b"), adapter_name="b")
    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="cat")
    ours = jlora.combine_adapters(adapted, {"a": 0.7, "b": 0.3}, method="cat", name="mix")
    node = _flat(ours)["params/fc1/kernel"]
    expected = 0.7 * np.asarray(node.delta(["a"])) + 0.3 * np.asarray(node.delta(["b"]))
    np.testing.assert_allclose(np.asarray(node.delta(["mix"])), expected, atol=1e-6)        # jlora: the weighted sum
    with torch.no_grad():
        theirs = model.base_model.model.fc1.get_delta_weight("mix").numpy().T
    assert model.peft_config["mix"].use_rslora and model.peft_config["mix"].r == 8
    np.testing.assert_allclose(theirs, np.sqrt(8) * expected, rtol=1e-5, atol=1e-6)       # PEFT: x sqrt(r_new)


def test_a_file_jlora_wrote_refuses_flipped_bytes_and_edited_maths_but_not_a_moved_base(tmp_path):
    import struct

    params, adapted = _mlp_adapted(jlora.LoRA(rank=4, alpha=8, targets=["fc1", "fc2"]))
    out = save_peft(tmp_path / "ad", adapted, default_naming, base_model_name_or_path="/old/home")
    weights = os.path.join(out, "adapter_model.safetensors")
    good = open(weights, "rb").read()
    config = _json(out)
    config["base_model_name_or_path"] = "/new/home"                    # provenance may be edited
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    load_peft(out, params, default_naming)
    config["lora_alpha"] = 16                                           # the maths may not
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(PeftFormatError, match=r"edited after jlora wrote it: lora_alpha 8 -> 16"):
        load_peft(out, params, default_naming)
    config["lora_alpha"] = 8
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    data = bytearray(good)
    start = 8 + struct.unpack("<Q", good[:8])[0]
    data[start + 5] ^= 0x01                                             # one bit of one factor
    open(weights, "wb").write(bytes(data))
    with pytest.raises(PeftFormatError, match=r"1 tensor\(s\) differ from the sha256 recorded"):
        load_peft(out, params, default_naming)
