"""PEFT adapter files on a Llama decoder: jlora <-> transformers + PEFT parity, per-layer and scanned.

A tiny random ``transformers.LlamaForCausalLM`` (2 layers, GQA 4/2 heads, untied head) is saved as
safetensors and loaded into :mod:`jlora.models.llama` with ``load_hf_params`` in both layouts
(``layers_{i}`` modules, and ``scan_layers=True`` with ``(L, in, out)`` kernels). Adapters go both
ways through ``jlora.io.save_peft`` / ``load_peft`` with ``llama.hf_module_name`` as the naming, and
the logits must agree with PyTorch PEFT's.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core.nodes import is_adapter_leaf
from jlora.core.paths import flatten_with_paths
from jlora.io import load_peft, save_peft
from jlora.models import llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("safetensors")

HF_CONFIG = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6)
IDS = np.random.default_rng(0).integers(0, 101, (2, 9)).astype(np.int32)
ATOL = 1e-4


def naming(path, layer=None):
    return llama.hf_module_name(path, layer, prefix="")  # a bare transformers LlamaForCausalLM


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, state_dict, per-layer (model, params), scanned (model, params))."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():  # every weight random, norms around 1
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    state = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    directory = tmp_path_factory.mktemp("tiny_llama")
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(hf.config.to_dict(), default=str))

    layouts = {}
    for scan in (False, True):
        config = llama.LlamaConfig.from_hf(directory, scan_layers=scan)
        params = llama.load_hf_params(directory, config)
        layouts[scan] = (llama.LlamaForCausalLM(config), params)
    assert "layers_1" in layouts[False][1]["params"]["model"]
    assert layouts[True][1]["params"]["model"]["layers"]["mlp"]["down_proj"]["kernel"].shape == (2, 48, 32)
    return directory, state, layouts


def _fresh_hf(state):
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
    model.load_state_dict(state)
    return model.eval()


def _torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS).long()).logits.numpy()


def _jlora_logits(model, tree):
    return np.asarray(jax.jit(jlora.lift(model.apply))(tree, jnp.asarray(IDS)))


def _flat(tree):
    return dict(flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0])


def _nonzero_b(adapted, seed):
    rng = np.random.default_rng(seed)

    def go(leaf):
        if isinstance(leaf, jlora.LoRANode):
            return leaf.with_(b={n: jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype) for n, v in leaf.b.items()})
        return leaf
    return jax.tree_util.tree_map(go, adapted, is_leaf=is_adapter_leaf)


def _report(what, err):
    print(f"\n{what}: max |logit diff| = {err:.2e}")
    return err


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
def test_jlora_adapter_loads_in_peft_with_equal_logits(tmp_path, checkpoint, scan):
    directory, state, layouts = checkpoint
    model, params = layouts[scan]
    spec = jlora.LoRA(rank=4, alpha=8, targets=llama.DEFAULT_TARGETS["all-linear"])
    kwargs = {"model": model.apply, "example": (jnp.asarray(IDS),)} if scan else {}
    adapted = _nonzero_b(jlora.apply(params, spec, key=jax.random.key(1), **kwargs), seed=3)
    nodes = {p: n for p, n in _flat(adapted).items() if isinstance(n, jlora.LoRANode)}
    assert len(nodes) == (7 if scan else 14) and "params/lm_head/kernel" not in nodes
    if scan:
        node = nodes["params/model/layers/self_attn/k_proj/kernel"]
        assert node.layout == jlora.Layout(1, 1, 1) and node.a["default"].shape == (2, 32, 4)

    out = save_peft(tmp_path / "ours", adapted, naming)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"])
    assert config["r"] == 4 and config["lora_alpha"] == 8

    hf = peft.PeftModel.from_pretrained(_fresh_hf(state), out).eval()
    # every module of both layers got its adapter (e.g. a k_proj of the GQA (32 -> 16) shape)
    k_proj = hf.base_model.model.model.layers[1].self_attn.k_proj
    assert tuple(k_proj.lora_B["default"].weight.shape) == (16, 4)
    layer = None if not scan else 1
    path = "params/model/" + ("layers" if scan else "layers_1") + "/self_attn/k_proj/kernel"
    b = np.asarray(nodes[path].b["default"])
    np.testing.assert_array_equal(k_proj.lora_B["default"].weight.detach().numpy(), (b[layer] if scan else b).T)

    expected = _jlora_logits(model, adapted)
    got = _torch_logits(hf)
    err = _report(f"jlora -> PEFT ({'scanned' if scan else 'per-layer'})", float(np.abs(got - expected).max()))
    assert err < ATOL
    assert np.abs(expected - _jlora_logits(model, params)).max() > 1e-2  # the adapter matters


@pytest.fixture(scope="module")
def peft_made(checkpoint, tmp_path_factory):
    """A PEFT-made adapter (q_proj, v_proj, down_proj; random A and B) and its logits."""
    _, state, _ = checkpoint
    torch.manual_seed(1)
    made = peft.get_peft_model(_fresh_hf(state), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)).eval()
    out = tmp_path_factory.mktemp("peft_made")
    made.save_pretrained(str(out))
    down_b = made.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.detach().numpy()
    return out, _torch_logits(made), down_b


@pytest.mark.parametrize("scan", [False, True], ids=["per-layer", "scanned"])
def test_peft_made_adapter_loads_with_equal_logits(checkpoint, peft_made, scan):
    _, _, layouts = checkpoint
    model, params = layouts[scan]
    out, expected, down_b = peft_made
    kwargs = {"model": model.apply, "example": (jnp.asarray(IDS),)} if scan else {}
    adapted = load_peft(out, params, naming, **kwargs)
    nodes = {p: n for p, n in _flat(adapted).items() if isinstance(n, jlora.LoRANode)}
    assert len(nodes) == (3 if scan else 6)
    path = "params/model/" + ("layers" if scan else "layers_1") + "/mlp/down_proj/kernel"
    node = nodes[path]
    assert node.meta["default"].rank == 4 and node.meta["default"].scale == 2.0
    b = np.asarray(node.b["default"])
    np.testing.assert_array_equal(b[1] if scan else b, down_b.T)

    got = _jlora_logits(model, adapted)
    err = _report(f"PEFT -> jlora ({'scanned' if scan else 'per-layer'})", float(np.abs(got - expected).max()))
    assert err < ATOL
    assert np.abs(got - _jlora_logits(model, params)).max() > 1e-2
    if scan:  # the stacked layout is also read off the file's shapes, without a model
        np.testing.assert_array_equal(_jlora_logits(model, load_peft(out, params, naming)), got)
