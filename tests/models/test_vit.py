"""jlora.models.vit: parity with transformers.ViTForImageClassification on tiny random configs
(no pretrained ViT is reachable here), scanned layers, LoRA lift == merge (linear layers and the
patch-embedding conv), loader validation and HF names."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jlora
from jlora.core.paths import matches
from jlora.models import vit

TINY = vit.ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=37, num_labels=3)
IMAGES = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)   # NHWC


@pytest.fixture(scope="module")
def tiny_params():
    """Random TINY weights (non-zero biases, LayerNorm scales != 1) built on the host: no compile."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(vit.ViTForImageClassification(TINY).init, jax.random.key(0), IMAGES)

    def fill(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.05 * rng.standard_normal(x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny_forward():
    return jax.jit(vit.ViTForImageClassification(TINY).apply)


def _hf_state_dict(params, cfg, prefix="vit."):
    """Our per-layer tree -> HF checkpoint tensor names (numpy; Linear weights transposed back,
    the conv kernel HWIO -> OIHW)."""
    flat = {tuple(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params["params"])}
    out = {}
    for hf, path, shape, perm in vit._expected_tensors(cfg, with_classifier=("classifier", "kernel") in flat):
        v = flat[path]
        v = v if perm is None else np.transpose(v, np.argsort(perm))
        assert v.shape == shape
        out[(prefix if not hf.startswith("classifier") else "") + hf] = np.ascontiguousarray(v)
    return out


# ---------------------------------------------------------------------------------------------
# config

def test_config_from_hf_and_validation(tmp_path):
    raw = {"model_type": "vit", "image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "hidden_act": "gelu",
           "layer_norm_eps": 1e-12, "qkv_bias": True, "encoder_stride": 16, "pooler_act": "tanh",
           "dtype": "float32", "id2label": {"0": "a", "1": "b", "2": "c"}}
    cfg = vit.ViTConfig.from_hf(raw)
    assert cfg == TINY and cfg.num_patches == 16 and cfg.seq_len == 17 and cfg.head_dim == 8
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert vit.ViTConfig.from_hf(tmp_path) == cfg == vit.ViTConfig.from_hf(tmp_path / "config.json")
    over = vit.ViTConfig.from_hf(raw, scan_layers=True, dtype="bfloat16", num_labels=4)
    assert over.scan_layers and over.dtype == jnp.bfloat16 and over.num_labels == 4
    rect = vit.ViTConfig.from_hf({**raw, "image_size": [32, 24], "patch_size": [8, 8]})
    assert rect.image_size == (32, 24) and rect.patch_size == 8 and rect.grid == (4, 3) and rect.seq_len == 13
    with pytest.raises(TypeError, match="unknown ViTConfig override"):
        vit.ViTConfig.from_hf(raw, hidden=3)
    with pytest.raises(ValueError, match="hidden_act"):
        vit.ViTConfig.from_hf({**raw, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="divisible"):
        vit.ViTConfig.from_hf(raw, num_attention_heads=5)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        vit.ViTConfig.from_hf(raw, num_hidden_layers=0)
    with pytest.raises(ValueError, match="image_size"):
        vit.ViTConfig.from_hf({**raw, "image_size": [32]})
    with pytest.raises(ValueError, match="patch_size"):
        vit.ViTConfig.from_hf(raw, patch_size=64)
    with pytest.raises(ValueError, match="qkv_bias"):
        vit.ViTConfig.from_hf(raw, qkv_bias=1)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        vit.ViTConfig.from_hf(raw, layer_norm_eps=0)
    with pytest.raises(ValueError, match="model_type"):
        vit.ViTConfig.from_hf({**raw, "model_type": "deit"})
    with pytest.raises(FileNotFoundError):
        vit.ViTConfig.from_hf(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# parity with transformers

def _torch_vit(torch, transformers, **kw):
    torch.manual_seed(0)
    hf_cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=37, num_labels=3, **kw)
    ref = transformers.ViTForImageClassification(hf_cfg).eval()
    with torch.no_grad():     # HF initialises biases and LayerNorms to 0 / 1: make them count
        for name, p in ref.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return hf_cfg, ref


def _torch_logits(torch, ref, images_nhwc):
    with torch.no_grad():
        pixel_values = torch.tensor(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))   # NHWC -> NCHW
        seq = ref.vit(pixel_values=pixel_values).last_hidden_state       # after the final LayerNorm
        return ref.classifier(seq[:, 0]).numpy(), seq.numpy()


def test_tiny_classifier_parity_with_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file as torch_save_file

    hf_cfg, ref = _torch_vit(torch, transformers, image_size=32, patch_size=8)
    # state_dict(): transformers >= 5 in-memory names (vit.layers.0.attention.q_proj ...)
    torch_save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = vit.ViTConfig.from_hf(hf_cfg.to_dict())
    assert cfg == TINY
    params = vit.load_hf_params(tmp_path, cfg, strict=True)
    # save_pretrained: the checkpoint names that Hub files use (vit.encoder.layer.0.attention.attention.query ...)
    ref.save_pretrained(tmp_path / "pretrained")
    assert vit.ViTConfig.from_hf(tmp_path / "pretrained") == cfg
    jax.tree_util.tree_map(np.testing.assert_array_equal, vit.load_hf_params(tmp_path / "pretrained", cfg, strict=True), params)

    logits = vit.ViTForImageClassification(cfg).apply(params, IMAGES)
    want, _ = _torch_logits(torch, ref, IMAGES)
    err = np.abs(np.asarray(logits) - want).max()
    print(f"tiny ViTForImageClassification logits max err {err:.2e} (|logits| max {np.abs(want).max():.2f})")
    assert err < 1e-4

    # names: checkpoint naming == the tensors in the saved file, transformers5 naming == live modules
    from safetensors.numpy import load_file
    saved = set(load_file(str(tmp_path / "pretrained" / "model.safetensors")))
    modules = dict(ref.named_modules())
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        p = "/".join(k.key for k in path)
        name, leaf = vit.hf_module_name(p), path[-1].key
        assert (name + "." + vit._LEAF_NAMES[leaf] if leaf in vit._LEAF_NAMES else name) in saved, p
        if leaf in vit._LEAF_NAMES:
            assert vit.hf_module_name(p, naming="transformers5") in modules, p
    stacked = vit.stack_layers(params)
    for path, _ in jax.tree_util.tree_leaves_with_path(stacked["params"]["encoder"]):
        for i in range(2):
            assert vit.hf_module_name("encoder/" + "/".join(k.key for k in path), layer=i, naming="transformers5") in modules

    # load_pretrained: backbone only, the file's head, a new head of another size
    model, p0 = vit.load_pretrained(tmp_path / "pretrained")
    assert isinstance(model, vit.ViTModel) and "classifier" not in p0["params"]
    model, p3 = vit.load_pretrained(tmp_path / "pretrained", num_labels=3)
    np.testing.assert_array_equal(p3["params"]["classifier"]["kernel"], params["params"]["classifier"]["kernel"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, p5 = vit.load_pretrained(tmp_path / "pretrained", num_labels=5, scan_layers=True)
    assert model.config.num_labels == 5 and p5["params"]["classifier"]["kernel"].shape == (32, 5)
    assert p5["params"]["encoder"]["layers"]["attention"]["attention"]["query"]["kernel"].shape == (2, 32, 32)


def test_parity_without_qkv_bias_non_square():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import tempfile
    from safetensors.torch import save_file as torch_save_file

    hf_cfg, ref = _torch_vit(torch, transformers, image_size=[24, 16], patch_size=8, num_channels=2,
                             qkv_bias=False, hidden_act="gelu_new")
    cfg = vit.ViTConfig.from_hf(hf_cfg.to_dict())
    assert cfg.image_size == (24, 16) and not cfg.qkv_bias and cfg.seq_len == 7
    images = np.random.default_rng(2).standard_normal((2, 24, 16, 2)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        torch_save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, d + "/model.safetensors")
        params = vit.load_hf_params(d, cfg, strict=True)
    assert "bias" not in params["params"]["encoder"]["layer_0"]["attention"]["attention"]["query"]
    seq = vit.ViTModel(cfg).apply(params, images)
    want_logits, want_seq = _torch_logits(torch, ref, images)
    logits = params["params"]["classifier"]
    logits = np.asarray(seq[:, 0]) @ np.asarray(logits["kernel"]) + np.asarray(logits["bias"])
    err = max(np.abs(np.asarray(seq) - want_seq).max(), np.abs(logits - want_logits).max())
    print(f"no-qkv-bias 24x16 ViT max err {err:.2e}")
    assert err < 1e-4


# ---------------------------------------------------------------------------------------------
# inputs, scanned layers, dropout

def test_input_validation(tiny_params):
    model = vit.ViTForImageClassification(TINY)
    with pytest.raises(ValueError, match="looks like NCHW"):
        model.apply(tiny_params, IMAGES.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"NHWC \(batch, 32, 32, 3\)"):
        model.apply(tiny_params, IMAGES[:, :16])
    with pytest.raises(ValueError, match="floating"):
        model.apply(tiny_params, IMAGES.astype(np.uint8))


def test_scan_layers_matches_per_layer(tiny_params, tiny_forward):
    ref = tiny_forward(tiny_params, IMAGES)
    stacked = vit.stack_layers(tiny_params)
    assert stacked["params"]["encoder"]["layers"]["intermediate"]["dense"]["kernel"].shape == (2, 32, 37)
    for remat in (False, True):
        model = vit.ViTForImageClassification(TINY.replace(scan_layers=True, remat=remat))
        out = jax.jit(model.apply)(stacked, IMAGES)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(np.testing.assert_array_equal, vit.unstack_layers(stacked), tiny_params)
    with pytest.raises(ValueError, match="encoder/layers"):
        vit.unstack_layers(tiny_params)


def test_dropout_uses_dropout_rng(tiny_params, tiny_forward):
    model = vit.ViTForImageClassification(TINY.replace(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2))
    train = jax.jit(lambda p, key: model.apply(p, IMAGES, deterministic=False, rngs={"dropout": key}))
    a, b = train(tiny_params, jax.random.key(1, impl="rbg")), train(tiny_params, jax.random.key(2, impl="rbg"))
    det = tiny_forward(tiny_params, IMAGES)
    assert not np.allclose(a, b) and not np.allclose(a, det)
    np.testing.assert_allclose(model.apply(tiny_params, IMAGES), det, atol=1e-6)   # deterministic by default (eager vs jit)


# ---------------------------------------------------------------------------------------------
# LoRA

def _randomize(adapted, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)

    def f(leaf):
        if not jlora.is_node(leaf):
            return leaf
        return leaf.with_(b={n: jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype) for n, v in leaf.b.items()})
    return jax.tree_util.tree_map(f, adapted, is_leaf=jlora.is_node)


CONV = r".*/patch_embeddings/projection/kernel"


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_lora_all_linear_and_conv_lifted_equals_merged(tiny_params, scan):
    params = vit.stack_layers(tiny_params) if scan else tiny_params
    model = vit.ViTForImageClassification(TINY.replace(scan_layers=scan))
    if scan:   # layouts traced from the model: the scanned (L, in, out) kernels and the HWIO conv kernel
        spec = jlora.LoRA(rank=4, alpha=8, targets=(vit.DEFAULT_TARGETS["all-linear"], CONV), exclude=vit.ALL_LINEAR_EXCLUDE)
        zero_b = jlora.apply(params, spec, jax.random.key(1), model=model.apply, example=(IMAGES,))
    else:      # 2-D kernels need no hint; the conv gets one (cheaper than tracing the model, same layout)
        spec = jlora.LoRA(rank=4, alpha=8, targets=(vit.DEFAULT_TARGETS["all-linear"], CONV), exclude=vit.ALL_LINEAR_EXCLUDE,
                          axes={CONV: jlora.Axes(stack=0, inputs=3)})
        zero_b = jlora.apply(params, spec, jax.random.key(1))
    nodes = {n.path: n for n in jax.tree_util.tree_leaves(zero_b, is_leaf=jlora.is_node) if jlora.is_node(n)}
    assert len(nodes) == 6 * (1 if scan else TINY.num_hidden_layers) + 1
    assert not any("classifier" in p for p in nodes)
    conv = nodes["params/embeddings/patch_embeddings/projection/kernel"]
    assert conv.layout == jlora.Layout(0, 3, 1)                       # HWIO: window + in -> out
    assert conv.a["default"].shape == (8, 8, 3, 4) and conv.b["default"].shape == (4, 32)
    if scan:
        q = nodes["params/encoder/layers/attention/attention/query/kernel"]
        assert q.layout == jlora.Layout(1, 1, 1) and q.a["default"].shape == (2, 32, 4)
    adapted = _randomize(zero_b)
    lifted, forward = jlora.lift(model.apply, strict=True), jax.jit(model.apply)
    out = np.asarray(lifted(adapted, IMAGES))
    merged = np.asarray(forward(jlora.merge(adapted), IMAGES))
    base = np.asarray(lifted(zero_b, IMAGES))                          # same shapes: no new compile
    err, effect = np.abs(out - merged).max(), np.abs(merged - base).max()
    # the conv adapter alone changes the output too (lift's conv rule, not only the Dense one)
    conv_only = jax.tree_util.tree_map(
        lambda n: n if not jlora.is_node(n) or n.path.endswith("projection/kernel") else n.with_(b={k: jnp.zeros_like(v) for k, v in n.b.items()}),
        adapted, is_leaf=jlora.is_node)
    conv_out = np.asarray(lifted(conv_only, IMAGES))
    conv_merged = np.asarray(forward(jlora.merge(conv_only), IMAGES))
    conv_err, conv_effect = np.abs(conv_out - conv_merged).max(), np.abs(conv_merged - base).max()
    print(f"scan={scan}: lifted-merged max err {err:.2e}, adapter effect {effect:.2e}; "
          f"conv only: err {conv_err:.2e}, effect {conv_effect:.2e}")
    assert err < 1e-4 and effect > 1e-3
    assert conv_err < 1e-4 and conv_effect > 1e-3


def test_default_targets(tiny_params):
    paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tiny_params)]
    pick = lambda target, exclude=(): sorted(p for p in paths if matches(p, (target,)) and not matches(p, exclude))
    assert pick(vit.DEFAULT_TARGETS["default"]) == [
        f"params/encoder/layer_{i}/attention/attention/{w}/kernel" for i in range(2) for w in ("query", "value")]
    linear = pick(vit.DEFAULT_TARGETS["all-linear"], (vit.ALL_LINEAR_EXCLUDE,))
    assert len(linear) == 12 and all(p.startswith("params/encoder/") for p in linear)
    assert not any("classifier" in p for p in pick(r".*kernel", (vit.ALL_LINEAR_EXCLUDE,)))


# ---------------------------------------------------------------------------------------------
# loader and names

def test_loader_roundtrip_and_errors(tmp_path, tiny_params):
    sd = _hf_state_dict(tiny_params, TINY)
    save_file(sd, str(tmp_path / "model.safetensors"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, vit.load_hf_params(tmp_path, TINY, strict=True), tiny_params)
    stacked = vit.load_hf_params(tmp_path / "model.safetensors", TINY.replace(scan_layers=True, param_dtype=jnp.bfloat16))
    k = stacked["params"]["encoder"]["layers"]["output"]["dense"]["kernel"]
    assert k.shape == (2, 37, 32) and k.dtype == jnp.bfloat16

    plain = {k.removeprefix("vit."): v for k, v in sd.items()}                       # no prefix
    save_file(plain, str(tmp_path / "plain.safetensors"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, vit.load_hf_params(tmp_path / "plain.safetensors", TINY), tiny_params)

    def fails(tensors, match, cfg=TINY, name="bad.safetensors"):
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(ValueError, match=match):
            vit.load_hf_params(tmp_path / name, cfg)

    missing = dict(sd)
    del missing["vit.encoder.layer.1.attention.attention.key.weight"]
    fails(missing, r"missing tensor 'encoder\.layer\.1\.attention\.attention\.key\.weight' \(expected shape \(32, 32\)\)")
    wrong = dict(sd, **{"vit.encoder.layer.0.intermediate.dense.weight": np.zeros((36, 32), np.float32)})
    fails(wrong, r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(36, 32\).*\(37, 32\)")
    fails(sd, r"position_embeddings.*\(1, 17, 32\), expected \(1, 65, 32\)", TINY.replace(image_size=64), "model2.safetensors")
    fails(sd, r"projection\.weight.*\(32, 3, 8, 8\), expected \(32, 1, 8, 8\)", TINY.replace(num_channels=1), "model3.safetensors")
    fails(sd, r"classifier\.weight", TINY.replace(num_labels=5), "model4.safetensors")   # head size comes from the config
    fails(dict(sd, **{"vit.layers.0.attention.q_proj.weight": sd["vit.encoder.layer.0.attention.attention.query.weight"]}),
          r"name the same parameter")

    extra = dict(sd, **{"vit.pooler.dense.weight": np.zeros((32, 32), np.float32)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.warns(UserWarning, match=r"not used by the ViT model: \['vit\.pooler\.dense\.weight'\]"):
        vit.load_hf_params(tmp_path / "extra.safetensors", TINY)
    with pytest.raises(ValueError, match="pooler"):
        vit.load_hf_params(tmp_path / "extra.safetensors", TINY, strict=True)
    # load_pretrained on a ViTModel-style directory: the pooler is dropped without a warning
    (tmp_path / "pooled").mkdir()
    save_file(extra, str(tmp_path / "pooled" / "model.safetensors"))
    (tmp_path / "pooled" / "config.json").write_text(json.dumps(
        {k: getattr(TINY, k) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                       "num_attention_heads", "intermediate_size", "num_labels")}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, loaded = vit.load_pretrained(tmp_path / "pooled", num_labels=3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, tiny_params)
    with pytest.raises(ValueError, match=r"query\.bias"):           # a checkpoint with q/k/v biases, config without
        vit.load_hf_params(tmp_path, TINY.replace(qkv_bias=False), strict=True)
    with pytest.raises(FileNotFoundError):
        vit.load_hf_params(tmp_path / "nowhere", TINY)


def test_hf_module_name():
    name = vit.hf_module_name
    assert name("params/encoder/layer_3/attention/attention/query/kernel") == "vit.encoder.layer.3.attention.attention.query"
    assert name("params/encoder/layers/attention/attention/query/kernel", layer=3) == "vit.encoder.layer.3.attention.attention.query"
    assert name("encoder/layer_0/layernorm_before/scale", prefix="") == "encoder.layer.0.layernorm_before"
    assert name("params/embeddings/patch_embeddings/projection/kernel") == "vit.embeddings.patch_embeddings.projection"
    assert name("params/embeddings/cls_token") == "vit.embeddings.cls_token"
    assert name("params/layernorm/bias") == "vit.layernorm"
    assert name("params/classifier/kernel") == "classifier"
    t5 = lambda p, **kw: name(p, naming="transformers5", **kw)
    assert t5("params/encoder/layer_1/attention/attention/value/kernel") == "vit.layers.1.attention.v_proj"
    assert t5("params/encoder/layers/attention/output/dense/bias", layer=0) == "vit.layers.0.attention.o_proj"
    assert t5("params/encoder/layer_1/intermediate/dense") == "vit.layers.1.mlp.fc1"
    assert t5("params/encoder/layer_1/output/dense/kernel", prefix="") == "layers.1.mlp.fc2"
    assert t5("params/encoder/layer_1/layernorm_after/scale") == "vit.layers.1.layernorm_after"
    with pytest.raises(ValueError, match="layer="):
        name("params/encoder/layers/intermediate/dense/kernel")
    with pytest.raises(ValueError, match="layer 3"):
        name("params/encoder/layer_3/intermediate/dense/kernel", layer=2)
    with pytest.raises(ValueError, match="not inside the encoder"):
        name("params/layernorm/scale", layer=0)
    with pytest.raises(ValueError, match="not a ViT parameter path"):
        name("params/pooler/dense/kernel")
    with pytest.raises(ValueError, match="naming"):
        name("params/layernorm/scale", naming="peft")
