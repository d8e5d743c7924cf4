"""PEFT files for DoRA and IA3 (jlora.io.peft): format, parity with PyTorch PEFT both ways, errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.nodes import is_adapter_leaf
from jlora.methods.dora import column_sq_norms
from jlora.core.paths import flatten_with_paths
from jlora.io import peft as jpeft
from jlora.io.peft import PeftFormatError, default_naming, load_peft, save_peft

KEY = jax.random.key(0)
X = np.asarray(jax.random.normal(jax.random.key(1), (5, 8)), np.float32)
STACK_NAMING = lambda path, layer: f"layers.{layer}.fc"  # noqa: E731


class MLP(nn.Module):
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16, use_bias=self.bias, name="fc1")(x))
        return nn.Dense(4, use_bias=self.bias, name="fc2")(x)


class Block(nn.Module):
    bias: bool = True

    @nn.compact
    def __call__(self, x, _):
        return jnp.tanh(nn.Dense(8, use_bias=self.bias, name="fc")(x)), None


class Stack(nn.Module):
    bias: bool = True

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = scan(bias=self.bias, name="layers")(x, None)
        return x


def _json(directory):
    with open(os.path.join(directory, "adapter_config.json")) as f:
        return json.load(f)


def _tensors(directory):
    from safetensors.numpy import load_file  # the reference reader

    return load_file(os.path.join(directory, "adapter_model.safetensors"))


def _flat(tree):
    return dict(flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0])


def _perturb(adapted, seed=3):
    """Non-zero B, magnitudes away from their init (DoRA), scales away from ones (IA3)."""
    rng = np.random.default_rng(seed)

    def noise(v, s):
        return jnp.asarray(rng.standard_normal(v.shape) * s, v.dtype)

    def go(leaf):
        if not isinstance(leaf, jlora.LoRANode):
            return leaf
        extra = {}
        for name, d in leaf.extra.items():
            extra[name] = {k: (v * (1 + noise(v, 0.2)) if k == "m" else 1 + noise(v, 0.5) if k == "l" else v)
                           for k, v in d.items()}
        return leaf.with_(b={n: noise(v, 0.3) for n, v in leaf.b.items()}, extra=extra)
    return jax.tree_util.tree_map(go, adapted, is_leaf=is_adapter_leaf)


def _assert_same(x, y, adapter="default"):
    fx, fy = _flat(x), _flat(y)
    assert fx.keys() == fy.keys()
    for p, a in fx.items():
        b = fy[p]
        assert type(a) is type(b), p
        if not isinstance(a, jlora.LoRANode):
            continue
        assert a.layout == b.layout, p
        ma, mb = a.meta[adapter], b.meta[adapter]
        assert (ma.method, ma.rank, ma.feedforward) == (mb.method, mb.rank, mb.feedforward), p
        np.testing.assert_allclose(ma.scale, mb.scale, rtol=1e-12)
        for f in ("a", "b"):
            assert (adapter in getattr(a, f)) == (adapter in getattr(b, f)), (p, f)
            if adapter in getattr(a, f):
                np.testing.assert_array_equal(np.asarray(getattr(a, f)[adapter]), np.asarray(getattr(b, f)[adapter]))
        assert a.extra[adapter].keys() == b.extra[adapter].keys(), p
        for k, v in a.extra[adapter].items():
            assert v.shape == b.extra[adapter][k].shape and v.dtype == b.extra[adapter][k].dtype, (p, k)
            np.testing.assert_array_equal(np.asarray(v), np.asarray(b.extra[adapter][k]), err_msg=f"{p} {k}")
        for k, v in a.cache.get(adapter, {}).items():
            np.testing.assert_allclose(np.asarray(v), np.asarray(b.cache[adapter][k]), rtol=1e-6, err_msg=f"{p} {k}")
        assert a.cache.get(adapter, {}).keys() == b.cache.get(adapter, {}).keys(), p


# ---------------------------------------------------------------------------------------------
# torch side

def _torch_mlp(params, bias=True):
    torch = pytest.importorskip("torch")

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(8, 16, bias=bias)
            self.fc2 = torch.nn.Linear(16, 4, bias=bias)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    model = TorchMLP()
    _load_dense(model, {f"{n}.": params["params"][n] for n in ("fc1", "fc2")})
    return model.eval()


def _torch_stack(params, bias=True):
    torch = pytest.importorskip("torch")

    class TorchStack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(
                [torch.nn.ModuleDict({"fc": torch.nn.Linear(8, 8, bias=bias)}) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer["fc"](x))
            return x

    model = TorchStack()
    fc = params["params"]["layers"]["fc"]
    _load_dense(model, {f"layers.{i}.fc.": {k: v[i] for k, v in fc.items()} for i in range(3)})
    return model.eval()


def _load_dense(model, modules):
    import torch

    state = {}
    for prefix, leaves in modules.items():
        state[prefix + "weight"] = torch.from_numpy(np.asarray(leaves["kernel"]).T.copy())
        if "bias" in leaves:
            state[prefix + "bias"] = torch.from_numpy(np.asarray(leaves["bias"]).copy())
    model.load_state_dict(state)


def _torch_out(model, x=X):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(np.array(x, np.float32))).numpy()


def _jax_out(module, adapted, x=X):
    return np.asarray(jlora.lift(module.apply, strict=True)(adapted, x))


# ---------------------------------------------------------------------------------------------
# DoRA

@pytest.mark.parametrize("case", ["plain", "rank_alpha_pattern"])
def test_dora_export_loads_in_peft_and_back(tmp_path, case):
    peft = pytest.importorskip("peft")
    kwargs = {} if case == "plain" else dict(rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 3})
    spec = jlora.DoRA(rank=4, alpha=8, targets=["fc1", "fc2"], **kwargs)
    params = MLP().init(KEY, X)
    adapted = _perturb(jlora.apply(params, spec, key=jax.random.key(2)))
    out = save_peft(tmp_path / case, adapted, default_naming, spec=spec)
    config = _json(out)
    assert config["peft_type"] == "LORA" and config["use_dora"] is True and config["target_modules"] == ["fc1", "fc2"]
    tensors = _tensors(out)
    assert {k: v.shape for k, v in tensors.items() if "magnitude" in k} == {
        "base_model.model.fc1.lora_magnitude_vector": (16,), "base_model.model.fc2.lora_magnitude_vector": (4,)}
    np.testing.assert_array_equal(tensors["base_model.model.fc1.lora_magnitude_vector"],
                                  np.asarray(_flat(adapted)["params/fc1/kernel"].extra["default"]["m"]))

    expected = _jax_out(MLP(), adapted)
    assert np.abs(expected - np.asarray(MLP().apply(params, X))).max() > 1e-2  # the adapter matters
    model = peft.PeftModel.from_pretrained(_torch_mlp(params), out).eval()
    assert model.base_model.model.fc1.use_dora["default"]
    err = np.abs(_torch_out(model) - expected).max()
    assert err <= 1e-5, err

    restored = load_peft(out, params, default_naming)
    _assert_same(adapted, restored)
    np.testing.assert_allclose(_jax_out(MLP(), restored), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["plain", "rslora_rank_pattern"])
def test_peft_made_dora_loads_with_equal_outputs(tmp_path, case):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    params = MLP().init(KEY, X)
    torch.manual_seed(0)
    kwargs = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"])
    if case == "rslora_rank_pattern":
        kwargs.update(use_rslora=True, rank_pattern={"fc2": 2}, alpha_pattern={"fc1": 3})
    model = peft.get_peft_model(_torch_mlp(params), peft.LoraConfig(init_lora_weights=False, use_dora=True, **kwargs))
    with torch.no_grad():  # magnitudes away from ||W0 + s B A||
        for name in ("fc1", "fc2"):
            m = getattr(model.base_model.model, name).lora_magnitude_vector["default"].weight
            m.mul_(1 + 0.3 * torch.randn_like(m))
    model.eval()
    model.save_pretrained(str(tmp_path / case))
    expected = _torch_out(model)
    adapted = load_peft(tmp_path / case, params, default_naming)
    got = _jax_out(MLP(), adapted)
    err = np.abs(got - expected).max()
    assert err <= 1e-5, err
    assert np.abs(got - np.asarray(MLP().apply(params, X))).max() > 1e-2
    node = _flat(adapted)["params/fc1/kernel"]
    assert node.meta["default"].method == "dora" and node.meta["default"].init == "peft"
    m = model.base_model.model.fc1.lora_magnitude_vector["default"].weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(node.extra["default"]["m"]), m)
    w0 = np.asarray(params["params"]["fc1"]["kernel"], np.float64)
    np.testing.assert_allclose(node.cache["default"]["w0_sq"], (w0 ** 2).sum(0), rtol=1e-6)
    # and out again: PEFT reads what jlora writes back
    again = save_peft(tmp_path / "again", adapted, default_naming,
                      spec=jlora.DoRA(rank=4, targets=["fc1"], rslora=case != "plain"))
    back = peft.PeftModel.from_pretrained(_torch_mlp(params), again).eval()
    np.testing.assert_allclose(_torch_out(back), expected, atol=1e-5, rtol=0)


def test_dora_stacked_kernel_exports_per_layer(tmp_path):
    peft = pytest.importorskip("peft")
    params = Stack().init(KEY, X)
    spec = jlora.DoRA(rank=2, alpha=4, targets=r".*/fc/kernel")
    adapted = _perturb(jlora.apply(params, spec, key=KEY, model=Stack().apply, example=(X,)))
    node = _flat(adapted)["params/layers/fc/kernel"]
    assert node.extra["default"]["m"].shape == (3, 8)
    out = save_peft(tmp_path / "stack", adapted, STACK_NAMING)
    tensors = _tensors(out)
    assert sorted(tensors) == sorted(f"base_model.model.layers.{i}.fc.{k}" for i in range(3)
                                     for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    for i in range(3):
        np.testing.assert_array_equal(tensors[f"base_model.model.layers.{i}.fc.lora_magnitude_vector"],
                                      np.asarray(node.extra["default"]["m"][i]))
    expected = _jax_out(Stack(), adapted)
    model = peft.PeftModel.from_pretrained(_torch_stack(params), out).eval()
    err = np.abs(_torch_out(model) - expected).max()
    assert err <= 1e-5, err
    for kwargs in ({"model": Stack().apply, "example": (X,)}, {}):  # layouts traced, or read off the file
        restored = load_peft(out, params, STACK_NAMING, **kwargs)
        _assert_same(adapted, restored)
        np.testing.assert_allclose(_jax_out(Stack(), restored), expected, atol=1e-6, rtol=0)


def test_qlora_is_written_as_plain_lora(tmp_path):
    spec = jlora.QLoRA(rank=2, alpha=4, targets=["fc1"], compute_dtype=jnp.float32)
    params = MLP().init(KEY, X)
    adapted = _perturb(jlora.apply(params, spec, key=KEY))
    out = save_peft(tmp_path / "q", adapted, default_naming)
    assert _json(out)["use_dora"] is False and sorted(_tensors(out)) == [
        "base_model.model.fc1.lora_A.weight", "base_model.model.fc1.lora_B.weight"]
    restored = load_peft(out, params, default_naming)
    node, qnode = _flat(restored)["params/fc1/kernel"], _flat(adapted)["params/fc1/kernel"]
    assert node.meta["default"].method == "lora"
    np.testing.assert_array_equal(np.asarray(node.b["default"]), np.asarray(qnode.b["default"]))


def test_one_file_holds_one_kind(tmp_path):
    params = MLP().init(KEY, X)
    mixed = jlora.apply(params, jlora.DoRA(rank=2, targets=["fc1"]), key=KEY)
    mixed = jlora.apply(mixed, jlora.LoRA(rank=2, targets=["fc2"]), key=KEY)  # same adapter name, other kernel
    with pytest.raises(ValueError, match=r"mixes DoRA \('params/fc1/kernel'\) and plain LoRA \('params/fc2/kernel'\)"):
        save_peft(tmp_path / "mixed", mixed, default_naming)
    ia3_lora = jlora.apply(jlora.apply(params, jlora.IA3(targets=["fc1"])), jlora.LoRA(rank=2, targets=["fc2"]), key=KEY)
    with pytest.raises(ValueError, match="IA3 on 'params/fc1/kernel' but lora on 'params/fc2/kernel'"):
        save_peft(tmp_path / "ia3_lora", ia3_lora, default_naming)
    assert not os.path.exists(tmp_path / "mixed") and not os.path.exists(tmp_path / "ia3_lora")
    # two names: each file is one kind
    both = jlora.apply(jlora.apply(params, jlora.DoRA(rank=2, targets=["fc1"]), key=KEY),
                       jlora.LoRA(rank=2, targets=["fc2"]), key=KEY, name="plain")
    assert _json(save_peft(tmp_path / "d", both, default_naming))["use_dora"] is True
    assert _json(save_peft(tmp_path / "p", both, default_naming, adapter="plain"))["use_dora"] is False


def test_dora_errors(tmp_path):
    params = MLP().init(KEY, X)
    adapted = _perturb(jlora.apply(params, jlora.DoRA(rank=4, alpha=8, targets=["fc1", "fc2"]), key=KEY))
    out = save_peft(tmp_path / "ok", adapted, default_naming)
    config, tensors = _json(out), jpeft._read_safetensors(os.path.join(out, "adapter_model.safetensors"))

    def write(name, config, tensors):
        d = tmp_path / name
        os.makedirs(d)
        with open(d / "adapter_config.json", "w") as f:
            json.dump(config, f)
        jpeft._write_safetensors(str(d / "adapter_model.safetensors"), tensors, {"format": "pt"})
        return d

    key = "base_model.model.fc1.lora_magnitude_vector"
    with pytest.raises(PeftFormatError, match=r"module 'fc1'.*expected lora_magnitude_vector \(16,\), found \(15,\)"):
        load_peft(write("shape", config, dict(tensors, **{key: np.ones(15, np.float32)})), params, default_naming)
    with pytest.raises(PeftFormatError, match="use_dora=true.*module 'fc1' has no lora_magnitude_vector"):
        load_peft(write("nomag", config, {k: v for k, v in tensors.items() if k != key}), params, default_naming)
    with pytest.raises(PeftFormatError, match="DoRA magnitude, but the config has use_dora=False"):
        load_peft(write("flag", dict(config, use_dora=False), tensors), params, default_naming)
    # the magnitude survives a save of the trainable half only if it is there
    trainable, _ = jlora.partition(adapted)
    with pytest.raises(ValueError, match="full adapted tree"):
        save_peft(tmp_path / "half", trainable, default_naming)


# ---------------------------------------------------------------------------------------------
# IA3

IA3_CASES = {  # case -> (feed-forward jlora patterns, PEFT feedforward_modules)
    "outputs": (None, []),
    "feedforward": (["fc1", "fc2"], ["fc1", "fc2"]),
    "mixed": (["fc2"], ["fc2"]),
}


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_ia3_export_loads_in_peft_and_back(tmp_path, case):
    peft = pytest.importorskip("peft")
    ff, peft_ff = IA3_CASES[case]
    params = MLP(bias=False).init(KEY, X)  # PEFT's output scaling also scales a bias; jlora's does not
    adapted = _perturb(jlora.apply(params, jlora.IA3(targets=["fc1", "fc2"], feedforward=ff)))
    out = save_peft(tmp_path / case, adapted, default_naming)
    config = _json(out)
    assert config["peft_type"] == "IA3" and config["target_modules"] == ["fc1", "fc2"]
    assert config["feedforward_modules"] == peft_ff and config["init_ia3_weights"] is True
    assert config["fan_in_fan_out"] is False and config["modules_to_save"] is None
    shapes = {k: v.shape for k, v in _tensors(out).items()}
    ff_set = set(peft_ff)
    assert shapes == {"base_model.model.fc1.ia3_l": (1, 8) if "fc1" in ff_set else (16, 1),
                      "base_model.model.fc2.ia3_l": (1, 16) if "fc2" in ff_set else (4, 1)}

    expected = _jax_out(MLP(bias=False), adapted)
    assert np.abs(expected - np.asarray(MLP(bias=False).apply(params, X))).max() > 1e-2
    model = peft.PeftModel.from_pretrained(_torch_mlp(params, bias=False), out).eval()
    assert model.base_model.model.fc2.is_feedforward is ("fc2" in ff_set)
    err = np.abs(_torch_out(model) - expected).max()
    assert err <= 1e-5, err

    restored = load_peft(out, params, default_naming)
    _assert_same(adapted, restored)
    np.testing.assert_allclose(_jax_out(MLP(bias=False), restored), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_peft_made_ia3_loads_with_equal_outputs(tmp_path, case):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    _, peft_ff = IA3_CASES[case]
    params = MLP(bias=False).init(KEY, X)
    model = peft.get_peft_model(_torch_mlp(params, bias=False),
                                peft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=peft_ff))
    torch.manual_seed(0)
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            l = getattr(model.base_model.model, name).ia3_l["default"]
            l.copy_(1 + 0.5 * torch.randn_like(l))
    model.eval()
    model.save_pretrained(str(tmp_path / case))
    expected = _torch_out(model)
    adapted = load_peft(tmp_path / case, params, default_naming)
    got = _jax_out(MLP(bias=False), adapted)
    err = np.abs(got - expected).max()
    assert err <= 1e-5, err
    for name, n_in, n_out in (("fc1", 8, 16), ("fc2", 16, 4)):
        node = _flat(adapted)[f"params/{name}/kernel"]
        meta = node.meta["default"]
        assert meta.method == "ia3" and meta.feedforward is (name in peft_ff) and node.a == {} and node.b == {}
        l = getattr(model.base_model.model, name).ia3_l["default"].detach().numpy()
        np.testing.assert_array_equal(np.asarray(node.extra["default"]["l"]), l.reshape(-1))
        assert node.extra["default"]["l"].shape == ((n_in,) if meta.feedforward else (n_out,))


def test_ia3_regex_feedforward_and_stacked_export(tmp_path):
    peft = pytest.importorskip("peft")
    params = Stack(bias=False).init(KEY, X)
    # layers 0..2 share one stacked kernel: feed-forward for all of them
    spec = jlora.IA3(targets=r".*/fc/kernel", feedforward=r".*/fc/kernel")
    adapted = _perturb(jlora.apply(params, spec, model=Stack(bias=False).apply, example=(X,)))
    assert _flat(adapted)["params/layers/fc/kernel"].extra["default"]["l"].shape == (3, 8)
    out = save_peft(tmp_path / "stack", adapted, STACK_NAMING)
    tensors = _tensors(out)
    assert {k: v.shape for k, v in tensors.items()} == {f"base_model.model.layers.{i}.fc.ia3_l": (1, 8) for i in range(3)}
    assert _json(out)["feedforward_modules"] == ["fc"]
    expected = _jax_out(Stack(bias=False), adapted)
    model = peft.PeftModel.from_pretrained(_torch_stack(params, bias=False), out).eval()
    err = np.abs(_torch_out(model) - expected).max()
    assert err <= 1e-5, err
    for kwargs in ({"model": Stack(bias=False).apply, "example": (X,)}, {}):
        restored = load_peft(out, params, STACK_NAMING, **kwargs)
        _assert_same(adapted, restored)

    # output scaling on the stack
    out2 = save_peft(tmp_path / "stack_out", _perturb(jlora.apply(params, jlora.IA3(targets=r".*/fc/kernel"),
                                                                   model=Stack(bias=False).apply, example=(X,))),
                     STACK_NAMING)
    assert {v.shape for v in _tensors(out2).values()} == {(8, 1)} and _json(out2)["feedforward_modules"] == []
    restored = load_peft(out2, params, STACK_NAMING)
    assert _flat(restored)["params/layers/fc/kernel"].meta["default"].feedforward is False

    # a feed-forward suffix that PEFT's dot-less endswith would over-match becomes an exact regex
    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, use_bias=False, name="fc")(nn.Dense(8, use_bias=False, name="ffc")(x))

    p2 = Two().init(KEY, X)
    ad2 = _perturb(jlora.apply(p2, jlora.IA3(targets=["fc", "ffc"], feedforward=[r"params/fc/kernel"])))
    config = _json(save_peft(tmp_path / "two", ad2, default_naming))
    assert config["feedforward_modules"] == "fc"  # ["fc"] would also make "ffc" feed-forward in PEFT
    restored = load_peft(tmp_path / "two", p2, default_naming)
    assert [_flat(restored)[f"params/{m}/kernel"].meta["default"].feedforward for m in ("fc", "ffc")] == [True, False]
    np.testing.assert_allclose(_jax_out(Two(), restored), _jax_out(Two(), ad2), atol=1e-6)


def test_ia3_bias_warning_and_errors(tmp_path):
    params = MLP().init(KEY, X)  # with biases
    adapted = _perturb(jlora.apply(params, jlora.IA3(targets=["fc1", "fc2"], feedforward=["fc2"])))
    with pytest.warns(UserWarning, match=r"params/fc1/kernel.*scales the bias"):
        out = save_peft(tmp_path / "ok", adapted, default_naming)
    with pytest.warns(UserWarning, match=r"\['fc1'\] including their bias"):
        load_peft(out, params, default_naming)
    config, tensors = _json(out), jpeft._read_safetensors(os.path.join(out, "adapter_model.safetensors"))

    def write(name, config, tensors):
        d = tmp_path / name
        os.makedirs(d)
        with open(d / "adapter_config.json", "w") as f:
            json.dump(config, f)
        jpeft._write_safetensors(str(d / "adapter_model.safetensors"), tensors, {"format": "pt"})
        return d

    # the config says feed-forward, the file holds an output scale (and the other way round)
    with pytest.raises(PeftFormatError, match=r"module 'fc1' is in feedforward_modules, so ia3_l should be \(1, in\); "
                                              r"found \(16, 1\)"):
        load_peft(write("ff", dict(config, feedforward_modules=["fc1", "fc2"]), tensors), params, default_naming)
    bad = dict(tensors, **{"base_model.model.fc2.ia3_l": np.ones((1, 15), np.float32)})
    with pytest.raises(PeftFormatError, match=r"shape mismatch for module 'fc2'.*expected ia3_l \(1, 16\), found \(1, 15\)"):
        load_peft(write("shape", config, bad), params, default_naming)
    with pytest.raises(PeftFormatError, match="unrecognised tensor.*lora_A.*IA3 adapter"):
        load_peft(write("lora", config, dict(tensors, **{"base_model.model.fc1.lora_A.weight": np.ones((2, 8))})),
                  params, default_naming)
    with pytest.raises(PeftFormatError, match=r"target_modules=.* leave out 1 module\(s\) .*\['fc3'\]"):
        load_peft(write("name", config, dict(tensors, **{"base_model.model.fc3.ia3_l": np.ones((4, 1))})),
                  params, default_naming)
    with pytest.raises(PeftFormatError, match=r"module 'fc3'.*matches no kernel"):   # covered, but not in params
        load_peft(write("name2", dict(config, target_modules=["fc1", "fc2", "fc3"]),
                        dict(tensors, **{"base_model.model.fc3.ia3_l": np.ones((4, 1))})), params, default_naming)
    # an IA3 file cannot go onto a kernel that already carries LoRA
    lora = jlora.apply(params, jlora.LoRA(rank=2, targets=["fc1"]), key=KEY)
    with pytest.raises(PeftFormatError, match="IA3 cannot be combined"):
        load_peft(out, lora, default_naming, adapter="ia3")


# ---------------------------------------------------------------------------------------------
# a real model

def test_minilm_dora_parity_both_ways(tmp_path):
    """Real all-MiniLM-L6-v2: jlora BertModel + DoRA vs transformers BertModel + PEFT (query, value)."""
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
            out = m(**{k: torch.from_numpy(np.asarray(batch[k])).long()
                       for k in ("input_ids", "attention_mask", "token_type_ids")})
        return out.last_hidden_state.numpy()

    def hf_model():
        return transformers.BertModel.from_pretrained(str(directory)).eval()

    # jlora -> PEFT
    spec = jlora.DoRA(rank=4, alpha=8, targets=["query", "value"])
    adapted = _perturb(jlora.apply(params, spec, key=KEY))
    out = save_peft(tmp_path / "ours", adapted, naming)
    assert _json(out)["use_dora"] is True
    expected = ours(adapted)
    assert np.abs(expected - ours(params)).max() > 1e-2
    err = np.abs(theirs(peft.PeftModel.from_pretrained(hf_model(), out).eval()) - expected).max()
    assert err <= 1e-4, err

    # PEFT -> jlora
    torch.manual_seed(0)
    made = peft.get_peft_model(hf_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    made.eval()
    made.save_pretrained(str(tmp_path / "made"))
    loaded = load_peft(tmp_path / "made", params, naming)
    node = _flat(loaded)["params/encoder/layer_0/attention/self/query/kernel"]
    w0 = np.asarray(params["params"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"])
    np.testing.assert_allclose(node.cache["default"]["w0_sq"], column_sq_norms(jnp.asarray(w0), node.layout), rtol=1e-6)
    err = np.abs(ours(loaded) - theirs(made)).max()
    assert err <= 1e-4, err


# ---------------------------------------------------------------------------------------------
# AdaLoRA (export only)

def _ada_trained(adapted, keep, seed=5):
    """A, B random; E random with the triplets not in ``keep`` ({path: bool mask, stack + (r,)}) zeroed,
    as the rank allocator leaves them."""
    rng = np.random.default_rng(seed)

    def go(path, leaf):
        if not isinstance(leaf, jlora.LoRANode):
            return leaf
        e = leaf.extra["default"]["e"]
        new_e = rng.standard_normal(e.shape) * np.asarray(keep[path], np.float32)
        return leaf.with_(a={"default": jnp.asarray(rng.standard_normal(leaf.a["default"].shape) * 0.3, jnp.float32)},
                          b={"default": jnp.asarray(rng.standard_normal(leaf.b["default"].shape) * 0.3, jnp.float32)},
                          extra={"default": {"e": jnp.asarray(new_e, jnp.float32)}})
    flat, treedef = flatten_with_paths(adapted, is_leaf=is_adapter_leaf)
    return jax.tree_util.tree_unflatten(treedef, [go(p, l) for p, l in flat])


@pytest.mark.parametrize("truncated", [False, True])
def test_adalora_export_loads_in_peft(tmp_path, truncated):
    peft = pytest.importorskip("peft")
    from jlora.methods.adalora import truncate

    spec = jlora.AdaLoRA(init_r=4, target_r=2, total_steps=100, tinit=10, tfinal=20, alpha=6.0,
                         targets=["fc1", "fc2"])
    params = MLP().init(KEY, X)
    keep = {"params/fc1/kernel": [True, False, True, False], "params/fc2/kernel": [False, True, True, True]}
    adapted = _ada_trained(jlora.apply(params, spec, key=jax.random.key(2)), keep)
    if truncated:                         # what jlora.io.save_adapter stores: only the kept triplets
        adapted = truncate(adapted)
        assert _flat(adapted)["params/fc1/kernel"].a["default"].shape == (8, 2)
    expected = _jax_out(MLP(), adapted)
    assert np.abs(expected - np.asarray(MLP().apply(params, X))).max() > 1e-2
    out = save_peft(tmp_path / "ada", adapted, default_naming, spec=spec)
    config = _json(out)
    assert config["peft_type"] == "ADALORA" and (config["init_r"], config["target_r"], config["total_step"]) == (4, 2, 100)
    assert config["lora_alpha"] == pytest.approx(6.0)
    # the kept triplets, in their original order when not truncated, kept-first (padded) when truncated
    want = keep if not truncated else {p: sorted(m, reverse=True) for p, m in keep.items()}
    assert config["rank_pattern"] == {"fc1.lora_E": want["params/fc1/kernel"], "fc2.lora_E": want["params/fc2/kernel"]}
    shapes = {k.removeprefix("base_model.model."): v.shape for k, v in _tensors(out).items()}
    assert shapes == {"fc1.lora_A": (2, 8), "fc1.lora_E": (2, 1), "fc1.lora_B": (16, 2),
                      "fc2.lora_A": (3, 16), "fc2.lora_E": (3, 1), "fc2.lora_B": (4, 3)}
    model = peft.PeftModel.from_pretrained(_torch_mlp(params), out).eval()
    assert model.base_model.model.fc1.ranknum["default"].item() == 4.0        # PEFT's scale stays alpha / init_r
    err = np.abs(_torch_out(model) - expected).max()
    print(f"\nAdaLoRA (truncated={truncated}) jlora -> PEFT max |diff| {err:.2e}")
    assert err <= 1e-5, err
    # and back: AdaLoRA nodes (E as extra["e"]) with the same outputs
    restored = load_peft(out, params, default_naming)
    node = _flat(restored)["params/fc2/kernel"]
    assert node.meta["default"].method == "adalora" and node.extra["default"]["e"].shape == (3,)
    assert node.meta["default"].scale == pytest.approx(6.0 / (4 + 1e-5))
    np.testing.assert_allclose(_jax_out(MLP(), restored), expected, atol=1e-6, rtol=0)


def test_adalora_stacked_export_and_errors(tmp_path):
    peft = pytest.importorskip("peft")
    spec = jlora.AdaLoRA(init_r=3, target_r=2, total_steps=50, targets=["fc"])
    params = Stack().init(KEY, X)
    keep = {"params/layers/fc/kernel": [[True, True, False], [False, False, True], [True, True, True]]}
    adapted = _ada_trained(jlora.apply(params, spec, key=jax.random.key(2), model=Stack().apply, example=(X,)), keep)
    out = save_peft(tmp_path / "s", adapted, STACK_NAMING, spec=spec)
    assert _json(out)["rank_pattern"] == {f"layers.{i}.fc.lora_E": m for i, m in enumerate(keep["params/layers/fc/kernel"])}
    assert _tensors(out)["base_model.model.layers.1.fc.lora_A"].shape == (1, 8)
    model = peft.PeftModel.from_pretrained(_torch_stack(params), out).eval()
    err = np.abs(_torch_out(model) - _jax_out(Stack(), adapted)).max()
    assert err <= 1e-5, err
    back = load_peft(out, params, STACK_NAMING, model=Stack().apply, example=(X,))
    e = np.asarray(_flat(back)["params/layers/fc/kernel"].extra["default"]["e"])
    assert e.shape == (3, 3) and [int((row != 0).sum()) for row in e] == [2, 1, 3]   # padded with zeros
    np.testing.assert_allclose(_jax_out(Stack(), back), _jax_out(Stack(), adapted), atol=1e-6, rtol=0)
    bad = _json(out)
    bad["rank_pattern"]["layers.0.fc.lora_E"] = [True, True, True]
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(bad, f)
    with pytest.raises(PeftFormatError, match="edited after jlora wrote it: rank_pattern"):
        load_peft(out, params, STACK_NAMING, model=Stack().apply, example=(X,))
    weights = os.path.join(out, "adapter_model.safetensors")   # as a PEFT-made file (no jlora record):
    jpeft._write_safetensors(weights, jpeft._read_safetensors(weights), {"format": "pt"})
    with pytest.raises(PeftFormatError, match="rank_pattern keeps 3 of 3 triplets, but the file holds 2"):
        load_peft(out, params, STACK_NAMING, model=Stack().apply, example=(X,))
    # one method per file; an untrained adapter (E all zero) is written whole
    both = jlora.apply(jlora.apply(MLP().init(KEY, X), jlora.AdaLoRA(init_r=2, target_r=1, total_steps=5, targets=["fc1"]),
                                   key=KEY), jlora.LoRA(rank=2, targets=["fc2"]), key=KEY)
    with pytest.raises(ValueError, match="holds one method"):
        save_peft(tmp_path / "both", both, default_naming)
    fresh = jlora.apply(MLP().init(KEY, X), jlora.AdaLoRA(init_r=2, target_r=1, total_steps=5, targets=["fc1"]), key=KEY)
    assert _tensors(save_peft(tmp_path / "fresh", fresh, default_naming))["base_model.model.fc1.lora_A"].shape == (2, 8)


def test_peft_made_adalora_loads_with_equal_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    import torch

    params = MLP().init(KEY, X)
    model = peft.get_peft_model(_torch_mlp(params), peft.AdaLoraConfig(
        init_r=3, target_r=2, total_step=10, lora_alpha=5, target_modules=["fc1", "fc2"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.5 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path / "ada")
    adapted = load_peft(tmp_path / "ada", params, default_naming)
    err = np.abs(_jax_out(MLP(), adapted) - _torch_out(model)).max()
    assert err <= 1e-5, err
    assert np.abs(_torch_out(model) - np.asarray(MLP().apply(params, X))).max() > 1e-2
