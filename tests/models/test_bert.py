"""jlora.models.bert: the real all-MiniLM-L6-v2 checkpoint, parity with transformers, scanned
layers, LoRA lift == merge, loader validation and HF names."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
from jlora import assets
from jlora.core.paths import matches
from jlora.models import bert

SENTENCES = [
    "A man is eating food.",
    "A man is eating a meal.",
    "The girl is playing a guitar.",
    "On a quiet afternoon the old fisherman mended his nets by the harbour wall.",  # forces padding
]

TINY = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=37, max_position_embeddings=64, num_labels=3)
TINY_IDS = np.array([[2, 17, 45, 98, 3, 61, 7], [2, 11, 9, 3, 0, 0, 0]], np.int32)
TINY_MASK = (np.arange(7)[None, :] < np.array([[7], [4]])).astype(np.int32)
TINY_TYPES = np.array([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], np.int32)


# ---------------------------------------------------------------------------------------------
# fixtures: the checkpoint is read and the MiniLM forward compiled once per module

@pytest.fixture(scope="module")
def minilm():
    return bert.load_pretrained()


@pytest.fixture(scope="module")
def minilm_out(minilm):
    model, params, tok = minilm
    batch = bert.encode(tok, SENTENCES)
    seq, pooled = jax.jit(model.apply)(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return batch, np.asarray(seq), np.asarray(pooled)


@pytest.fixture(scope="module")
def tiny_params():
    """Random TINY weights (non-zero biases, LayerNorm scales != 1) built on the host: no compile."""
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(bert.BertForSequenceClassification(TINY).init, jax.random.key(0), TINY_IDS, TINY_MASK)

    def fill(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.05 * rng.standard_normal(x.shape), x.dtype)
    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny_forward():
    return jax.jit(bert.BertForSequenceClassification(TINY).apply)


def _hf_state_dict(params, cfg, prefix="bert."):
    """Our per-layer tree -> HF tensor names (numpy, Linear weights transposed back)."""
    flat = {tuple(k.key for k in path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(params["params"])}
    out = {}
    for hf, path, shape, transpose in bert._expected_tensors(cfg, with_classifier=("classifier", "kernel") in flat):
        v = flat[path]
        out[(prefix if not hf.startswith("classifier") else "") + hf] = np.ascontiguousarray(v.T if transpose else v)
    return out


# ---------------------------------------------------------------------------------------------
# config

def test_config_from_hf_and_validation(tmp_path):
    d = assets.path("minilm", "model")
    cfg = bert.BertConfig.from_hf(d)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (384, 6, 12, 1536)
    assert cfg.vocab_size == 30522 and cfg.layer_norm_eps == 1e-12 and cfg.hidden_act == "gelu"
    assert bert.BertConfig.from_hf(d / "config.json") == cfg
    raw = json.loads((d / "config.json").read_text())
    over = bert.BertConfig.from_hf(raw, scan_layers=True, dtype="bfloat16", num_labels=4)
    assert over.scan_layers and over.dtype == jnp.bfloat16 and over.num_labels == 4
    assert bert.BertConfig.from_hf({**raw, "id2label": {"0": "a", "1": "b", "2": "c"}}).num_labels == 3
    with pytest.raises(TypeError, match="unknown BertConfig override"):
        bert.BertConfig.from_hf(raw, hidden=3)
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig.from_hf({**raw, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="divisible"):
        bert.BertConfig.from_hf(raw, num_attention_heads=5)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        bert.BertConfig.from_hf(raw, num_hidden_layers=0)
    with pytest.raises(ValueError, match="model_type"):
        bert.BertConfig.from_hf({**raw, "model_type": "roberta"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.from_hf({**raw, "position_embedding_type": "relative_key"})
    with pytest.raises(FileNotFoundError):
        bert.BertConfig.from_hf(tmp_path)


# ---------------------------------------------------------------------------------------------
# the real checkpoint

def test_loaded_tree_matches_model_init(minilm):
    model, params, _ = minilm
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = lambda t: jax.tree_util.tree_map(lambda x: (tuple(x.shape), str(x.dtype)), t)
    assert shapes(params) == shapes(jax.eval_shape(model.init, jax.random.key(0), ids))
    p = params["params"]
    assert p["encoder"]["layer_3"]["attention"]["self"]["query"]["kernel"].shape == (384, 384)
    assert p["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"].shape == (384, 1536)
    assert p["encoder"]["layer_0"]["output"]["dense"]["kernel"].shape == (1536, 384)
    assert p["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 384)
    # Linear weights are transposed: x @ kernel == x @ weight.T
    raw = load_file(str(assets.path("minilm", "model", "model.safetensors")))
    np.testing.assert_array_equal(p["encoder"]["layer_5"]["attention"]["self"]["key"]["kernel"],
                                  raw["encoder.layer.5.attention.self.key.weight"].T)
    scanned = bert.stack_layers(params)
    assert scanned["params"]["encoder"]["layers"]["attention"]["self"]["query"]["kernel"].shape == (6, 384, 384)
    smodel = bert.BertModel(model.config.replace(scan_layers=True))
    assert shapes(scanned) == shapes(jax.eval_shape(smodel.init, jax.random.key(0), ids))


def test_minilm_sentence_similarity(minilm_out):
    batch, seq, _ = minilm_out
    assert batch["input_ids"].dtype == np.int32 and batch["attention_mask"][0].sum() < batch["input_ids"].shape[1]
    emb = np.asarray(bert.mean_pool(seq, batch["attention_mask"]))
    emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    same, other = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    print(f"cosine(food, meal)={same:.4f} cosine(food, guitar)={other:.4f}")
    assert 0.90 < same < 0.95      # 0.926 with sentence-transformers
    assert other < 0.05            # -0.067


def test_minilm_parity_with_transformers(minilm, minilm_out):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    batch, seq, pooled = minilm_out
    ref = transformers.BertModel.from_pretrained(str(assets.path("minilm", "model"))).eval()
    with torch.no_grad():
        out = ref(input_ids=torch.tensor(batch["input_ids"], dtype=torch.long),
                  attention_mask=torch.tensor(batch["attention_mask"], dtype=torch.long),
                  token_type_ids=torch.tensor(batch["token_type_ids"], dtype=torch.long))
    mask = batch["attention_mask"].astype(bool)
    err_seq = np.abs(out.last_hidden_state.numpy() - seq)[mask].max()   # padded positions: garbage on both sides
    err_pool = np.abs(out.pooler_output.numpy() - pooled).max()
    print(f"MiniLM parity: last_hidden_state max err {err_seq:.2e}, pooler_output max err {err_pool:.2e}")
    assert err_seq < 1e-4 and err_pool < 1e-4
    # our names are the HF module names (prefix "" for a bare BertModel)
    modules = dict(ref.named_modules())
    for path, _ in jax.tree_util.tree_leaves_with_path(minilm[1]):
        name = bert.hf_module_name("/".join(k.key for k in path), prefix="")
        assert name in modules, name


def test_tiny_classifier_parity_with_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file as torch_save_file

    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=37, vocab_size=99, num_labels=3)
    ref = transformers.BertForSequenceClassification(hf_cfg).eval()
    torch_save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = bert.BertConfig.from_hf(hf_cfg.to_dict())
    assert cfg.num_labels == 3 and cfg.intermediate_size == 37
    params = bert.load_hf_params(tmp_path, cfg, strict=True)
    logits = bert.BertForSequenceClassification(cfg).apply(params, TINY_IDS, TINY_MASK, TINY_TYPES)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(TINY_IDS, dtype=torch.long), attention_mask=torch.tensor(TINY_MASK, dtype=torch.long),
                   token_type_ids=torch.tensor(TINY_TYPES, dtype=torch.long)).logits.numpy()
    err = np.abs(np.asarray(logits) - want).max()
    print(f"tiny BertForSequenceClassification logits max err {err:.2e}")
    assert err < 1e-4
    modules = dict(ref.named_modules())
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        name = bert.hf_module_name("/".join(k.key for k in path))      # default prefix "bert."
        assert name in modules, name
    # the scanned layout maps to the same names, layer by layer
    stacked = bert.stack_layers(params)
    for path, _ in jax.tree_util.tree_leaves_with_path(stacked["params"]["encoder"]):
        for i in range(2):
            assert bert.hf_module_name("encoder/" + "/".join(k.key for k in path), layer=i) in modules


# ---------------------------------------------------------------------------------------------
# scanned layers, dropout, LoRA

def test_scan_layers_matches_per_layer(tiny_params, tiny_forward):
    ref = tiny_forward(tiny_params, TINY_IDS, TINY_MASK, TINY_TYPES)
    stacked = bert.stack_layers(tiny_params)
    for remat in (False, True):
        model = bert.BertForSequenceClassification(TINY.replace(scan_layers=True, remat=remat))
        out = jax.jit(model.apply)(stacked, TINY_IDS, TINY_MASK, TINY_TYPES)
        # same math; XLA may fuse the scanned body differently (~1e-9 here)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-6)
    back = bert.unstack_layers(stacked)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tiny_params)
    with pytest.raises(ValueError, match="encoder/layers"):
        bert.unstack_layers(tiny_params)
    # whatever sits in padded positions does not reach the real tokens
    garbage = np.where(TINY_MASK > 0, TINY_IDS, 55)
    np.testing.assert_allclose(np.asarray(tiny_forward(tiny_params, garbage, TINY_MASK, TINY_TYPES)), np.asarray(ref), atol=1e-6)


def test_dropout_uses_dropout_rng(tiny_params, tiny_forward):
    model = bert.BertForSequenceClassification(TINY)
    train = jax.jit(lambda p, key: model.apply(p, TINY_IDS, TINY_MASK, deterministic=False, rngs={"dropout": key}))
    det = tiny_forward(tiny_params, TINY_IDS, TINY_MASK)
    # rbg keys: the same semantics, a third of threefry's compile time on CPU
    a, b = train(tiny_params, jax.random.key(1, impl="rbg")), train(tiny_params, jax.random.key(2, impl="rbg"))
    assert not np.allclose(a, det) and not np.allclose(a, b)


def _randomize(adapted, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)

    def f(leaf):
        if not jlora.is_node(leaf):
            return leaf
        return leaf.with_(b={n: jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype) for n, v in leaf.b.items()})
    return jax.tree_util.tree_map(f, adapted, is_leaf=jlora.is_node)


@pytest.mark.parametrize("scan", [False, True], ids=["per_layer", "scanned"])
def test_lora_all_linear_lifted_equals_merged(tiny_params, scan):
    """lift == merge with non-zero B, fp32 (tight) and, for the scanned model, bf16 compute (loose)."""
    params = bert.stack_layers(tiny_params) if scan else tiny_params
    model = bert.BertModel(TINY.replace(scan_layers=scan))
    spec = jlora.LoRA(rank=4, alpha=8, targets=bert.DEFAULT_TARGETS["all-linear"], exclude=bert.ALL_LINEAR_EXCLUDE)
    # the scanned (L, in, out) kernels need their layout traced from the model
    zero_b = jlora.apply(params, spec, jax.random.key(1), model=model.apply, example=(TINY_IDS, TINY_MASK))
    nodes = [n for n in jax.tree_util.tree_leaves(zero_b, is_leaf=jlora.is_node) if jlora.is_node(n)]
    assert len(nodes) == 6 * (1 if scan else TINY.num_hidden_layers)
    assert not any("pooler" in n.path or "classifier" in n.path for n in nodes)
    if scan:
        q = next(n for n in nodes if n.path.endswith("self/query/kernel"))
        assert q.layout == jlora.Layout(1, 1, 1) and q.a["default"].shape == (2, 32, 4)
    adapted = _randomize(zero_b)
    f32 = lambda x: np.asarray(x, np.float32)
    for dtype in ((jnp.float32, jnp.bfloat16) if scan else (jnp.float32,)):
        model = bert.BertModel(TINY.replace(scan_layers=scan, dtype=dtype))
        lifted = jlora.lift(model.apply, strict=True)
        seq, pooled = lifted(adapted, TINY_IDS, TINY_MASK)
        seq_m, pooled_m = jax.jit(model.apply)(jlora.merge(adapted), TINY_IDS, TINY_MASK)
        seq_0, _ = lifted(zero_b, TINY_IDS, TINY_MASK)          # same shapes: no new compile; == base model
        assert seq.dtype == jnp.dtype(dtype) and pooled.dtype == jnp.dtype(dtype)
        atol = 1e-4 if dtype == jnp.float32 else 0.05          # bf16: 1-2 ulp at |x| ~ 2
        err = max(np.abs(f32(seq) - f32(seq_m)).max(), np.abs(f32(pooled) - f32(pooled_m)).max())
        effect = np.abs(f32(seq_m) - f32(seq_0)).max()
        print(f"scan={scan} {jnp.dtype(dtype).name}: lifted-merged max err {err:.2e}, adapter effect {effect:.2e}")
        assert err < atol and effect > 2 * atol


def test_default_targets(tiny_params):
    paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(tiny_params)]
    pick = lambda target, exclude=(): sorted(p for p in paths if matches(p, (target,))
                                             and not matches(p, exclude))
    assert pick(bert.DEFAULT_TARGETS["default"]) == [
        f"params/encoder/layer_{i}/attention/self/{w}/kernel" for i in range(2) for w in ("query", "value")]
    linear = pick(bert.DEFAULT_TARGETS["all-linear"], (bert.ALL_LINEAR_EXCLUDE,))
    assert len(linear) == 12 and all(p.startswith("params/encoder/") for p in linear)
    assert "params/pooler/dense/kernel" in pick(bert.DEFAULT_TARGETS["all-linear"])


# ---------------------------------------------------------------------------------------------
# loader

def test_loader_roundtrip_and_errors(tmp_path, tiny_params):
    sd = _hf_state_dict(tiny_params, TINY)
    sd["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
    save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = bert.load_hf_params(tmp_path, TINY, strict=True)                       # "bert." prefix
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, tiny_params)
    stacked = bert.load_hf_params(tmp_path / "model.safetensors", TINY.replace(scan_layers=True, param_dtype=jnp.bfloat16))
    assert stacked["params"]["encoder"]["layers"]["output"]["dense"]["kernel"].shape == (2, 37, 32)
    assert stacked["params"]["encoder"]["layers"]["output"]["dense"]["kernel"].dtype == jnp.bfloat16

    plain = {k.removeprefix("bert."): v for k, v in sd.items()}                      # no prefix
    save_file(plain, str(tmp_path / "plain.safetensors"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, bert.load_hf_params(tmp_path / "plain.safetensors", TINY), tiny_params)

    missing = dict(sd)
    del missing["bert.encoder.layer.1.attention.self.key.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight.*\(32, 32\)"):
        bert.load_hf_params(tmp_path / "missing.safetensors", TINY)

    wrong = dict(sd)
    wrong["bert.encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight.*\(36, 32\).*\(37, 32\)"):
        bert.load_hf_params(tmp_path / "wrong.safetensors", TINY)
    with pytest.raises(ValueError, match=r"classifier\.weight"):                       # head size comes from the config
        bert.load_hf_params(tmp_path, TINY.replace(num_labels=5))

    extra = {**sd, "cls.predictions.bias": np.zeros(99, np.float32)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.warns(UserWarning, match="cls.predictions.bias"):
        bert.load_hf_params(tmp_path / "extra.safetensors", TINY)
    with pytest.raises(ValueError, match="cls.predictions.bias"):
        bert.load_hf_params(tmp_path / "extra.safetensors", TINY, strict=True)


def test_load_pretrained_new_head_and_scan(minilm):
    _, base_params, _ = minilm
    model, params, _ = bert.load_pretrained(num_labels=3, scan_layers=True, seed=7)
    assert isinstance(model, bert.BertForSequenceClassification) and model.config.scan_layers
    head = params["params"]["classifier"]
    assert head["kernel"].shape == (384, 3) and not np.any(np.asarray(head["bias"]))
    assert 0.01 < float(jnp.std(head["kernel"])) < 0.03
    again = bert.load_pretrained(num_labels=3, scan_layers=True, seed=7)[1]["params"]["classifier"]["kernel"]
    np.testing.assert_array_equal(head["kernel"], again)
    np.testing.assert_array_equal(params["params"]["encoder"]["layers"]["attention"]["self"]["query"]["kernel"][2],
                                  base_params["params"]["encoder"]["layer_2"]["attention"]["self"]["query"]["kernel"])


# ---------------------------------------------------------------------------------------------
# names and text helpers

def test_hf_module_name():
    name = bert.hf_module_name
    assert name("params/encoder/layer_3/attention/self/query/kernel") == "bert.encoder.layer.3.attention.self.query"
    assert name("params/encoder/layers/attention/self/query/kernel", layer=3) == "bert.encoder.layer.3.attention.self.query"
    assert name("encoder/layer_0/attention/output/LayerNorm/scale") == "bert.encoder.layer.0.attention.output.LayerNorm"
    assert name("params/encoder/layer_5/output/dense", prefix="") == "encoder.layer.5.output.dense"
    assert name("params/embeddings/word_embeddings/embedding") == "bert.embeddings.word_embeddings"
    assert name("params/pooler/dense/kernel", prefix="") == "pooler.dense"
    assert name("params/classifier/kernel") == "classifier"
    with pytest.raises(ValueError, match="layer="):
        name("params/encoder/layers/intermediate/dense/kernel")
    with pytest.raises(ValueError, match="layer 3"):
        name("params/encoder/layer_3/intermediate/dense/kernel", layer=2)
    with pytest.raises(ValueError, match="not a BERT parameter path"):
        name("params/decoder/dense/kernel")


def test_encode_and_mean_pool(minilm):
    _, _, tok = minilm
    assert tok.padding is None and tok.truncation is None
    b = bert.encode(tok, ["hello world", "a much longer sentence with many more words in it"], max_length=6)
    assert b["input_ids"].shape == (2, 6) and all(v.dtype == np.int32 for v in b.values())
    assert b["input_ids"][0, :4].tolist() == [101, 7592, 2088, 102] and b["input_ids"][0, 4:].tolist() == [0, 0]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6] and b["input_ids"][1, -1] == 102
    fixed = bert.encode(tok, "hello world", max_length=8, padding="max_length")
    assert fixed["input_ids"].shape == (1, 8)
    pair = bert.encode(tok, [("a cat", "a dog")])
    assert pair["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert tok.padding is None and tok.truncation is None                 # settings restored
    x = jnp.arange(12.0).reshape(1, 3, 4)
    np.testing.assert_allclose(bert.mean_pool(x, np.array([[1, 1, 0]])), x[:, :2].mean(1))


# ---------------------------------------------------------------------------------------------
# check_inputs: out-of-range ids / too-long sequences raise on the host, naming what and where

def test_check_inputs_names_out_of_range_ids_and_their_position():
    bert.check_inputs(TINY, TINY_IDS, TINY_MASK, TINY_TYPES)                    # vocab 99, 2 types, 64 positions
    bert.check_inputs(TINY, TINY_IDS.tolist())
    bert.check_inputs(TINY, jnp.asarray(TINY_IDS), jnp.asarray(TINY_MASK, bool), jnp.asarray(TINY_TYPES))

    ids = TINY_IDS.copy()
    ids[1, 5] = 99                                              # == vocab_size
    with pytest.raises(ValueError, match=r"bert.check_inputs: input_ids\[1, 5\] = 99 is out of range: "
                                         r"valid ids are \[0, vocab_size\) = \[0, 99\)"):
        bert.check_inputs(TINY, ids, TINY_MASK, TINY_TYPES)
    ids = TINY_IDS.copy()
    ids[0, 3] = -1
    with pytest.raises(ValueError, match=r"input_ids\[0, 3\] = -1 is out of range.*\[0, 99\)"):
        bert.check_inputs(TINY, ids)
    types = TINY_TYPES.copy()
    types[1, 2] = 2                                             # == type_vocab_size
    with pytest.raises(ValueError, match=r"token_type_ids\[1, 2\] = 2 is out of range: valid ids are "
                                         r"\[0, type_vocab_size\) = \[0, 2\)"):
        bert.check_inputs(TINY, TINY_IDS, TINY_MASK, types)
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(2, 6\), input_ids \(2, 7\)"):
        bert.check_inputs(TINY, TINY_IDS, token_type_ids=TINY_TYPES[:, :6])
    long_ids = np.ones((1, TINY.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match=r"sequence length 65 .* exceeds max_position_embeddings=64"):
        bert.check_inputs(TINY, long_ids)
    bert.check_inputs(TINY, long_ids[:, :64])

    mask = TINY_MASK.astype(np.float32)
    mask[0, 4] = 0.5
    with pytest.raises(ValueError, match=r"attention_mask\[0, 4\] = 0.5 is not 0 or 1"):
        bert.check_inputs(TINY, TINY_IDS, mask)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 7\), input_ids \(2, 7\)"):
        bert.check_inputs(TINY, TINY_IDS, TINY_MASK[:1])
    with pytest.raises(TypeError, match="input_ids must hold integers"):
        bert.check_inputs(TINY, TINY_IDS.astype(np.float64))
    with pytest.raises(TypeError, match="token_type_ids is a jax tracer.*host-side check"):
        jax.jit(lambda t: bert.check_inputs(TINY, TINY_IDS, token_type_ids=t))(TINY_TYPES)


def test_a_sharded_transformers_directory_loads_like_a_single_file(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=32)
    model = transformers.BertModel(config)
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    assert (tmp_path / "many" / "model.safetensors.index.json").is_file()
    cfg = bert.BertConfig.from_hf(tmp_path / "one")
    one, many = bert.load_hf_params(tmp_path / "one", cfg), bert.load_hf_params(tmp_path / "many", cfg)
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    (tmp_path / "one" / "model.safetensors").rename(tmp_path / "one" / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pickles are not read"):
        bert.load_hf_params(tmp_path / "one", cfg)
