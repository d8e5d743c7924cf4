"""jlora.methods.prompt: prompt tuning, prefix tuning (deep prompts and Li & Liang), P-tuning v1,
and the model protocol (``prompt_embeddings`` / ``prefix``) on the reference BERT and Llama."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.core.paths import flatten_with_paths
from jlora.methods import prompt as jp
from jlora.models import bert, llama
from tests.models.test_llama import tiny as tiny_llama_config, tiny_params as tiny_llama_params

BERT_TINY = bert.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37, max_position_embeddings=64, num_labels=3)
IDS = np.array([[2, 17, 45, 98, 3, 61, 7], [2, 11, 9, 3, 0, 0, 0]], np.int32)
MASK = (np.arange(7)[None, :] < np.array([[7], [4]])).astype(np.int32)
TYPES = np.array([[0, 0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0, 0]], np.int32)


@functools.lru_cache(maxsize=None)
def bert_params(cfg=BERT_TINY, seed=0):
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(bert.BertForSequenceClassification(cfg).init, jax.random.key(0), IDS, MASK)

    def fill(path, x):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(base + 0.3 * rng.standard_normal(x.shape), x.dtype)
    params = jax.tree_util.tree_map_with_path(fill, shapes)
    return bert.stack_layers(params) if cfg.scan_layers else params


@functools.lru_cache(maxsize=None)
def tiny_llama(**kw):
    config = tiny_llama_config(**kw)
    model = llama.LlamaForCausalLM(config)
    return model, tiny_llama_params(config), jax.jit(model.apply)


def _trainable_paths(tree):
    from jlora.core.nodes import is_adapter_leaf

    return sorted(p for p, leaf in flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0]
                  if isinstance(leaf, jlora.Trainable))


# ---------------------------------------------------------------------------------------------
# specs

def test_bad_specs_raise_value_errors_naming_the_value():
    for bad in (0, -3, 2.5, "4", True):
        with pytest.raises(ValueError, match=f"num_virtual_tokens must be a positive int, got {bad!r}"):
            jlora.PromptTuning(bad)
    with pytest.raises(ValueError, match="num_virtual_tokens.*got 0"):
        jlora.PrefixTuning(0)
    with pytest.raises(ValueError, match="num_virtual_tokens.*got -1"):
        jlora.PTuning(-1)
    with pytest.raises(ValueError, match="init must be one of .*got 'embeddings'"):
        jlora.PromptTuning(4, init="embeddings")
    with pytest.raises(ValueError, match="needs a non-empty init_text, got None"):
        jlora.PromptTuning(4, init="text")
    with pytest.raises(ValueError, match="init_text is only used with init='text'"):
        jlora.PromptTuning(4, init_text="hello")
    with pytest.raises(ValueError, match="projection_hidden must be a positive int, got 0"):
        jlora.PrefixTuning(4, projection_hidden=0)
    with pytest.raises(ValueError, match="encoder must be one of .*got 'gru'"):
        jlora.PTuning(4, encoder="gru")
    with pytest.raises(ValueError, match="hidden must be a positive int, got -8"):
        jlora.PTuning(4, hidden=-8)
    with pytest.raises(TypeError, match="PromptTuning / PrefixTuning / PTuning"):
        jlora.apply_prompt({"params": {}}, jlora.LoRA(rank=2, targets="kernel"), config=BERT_TINY)
    _, params, _ = tiny_llama()
    with pytest.raises(ValueError, match="needs tokenizer="):
        jlora.apply_prompt(params, jlora.PromptTuning(3, init="text", init_text="hi"), config=tiny_llama_config())
    with pytest.raises(ValueError, match="matched 0 leaves"):
        jlora.apply_prompt(params, jlora.PromptTuning(3, init="vocab", embedding=r".*/nothing/embedding"),
                           config=tiny_llama_config())
    adapted = jlora.apply_prompt(params, jlora.PromptTuning(3), config=tiny_llama_config())
    with pytest.raises(ValueError, match="already carry a prompt"):
        jlora.apply_prompt(adapted, jlora.PromptTuning(3), config=tiny_llama_config())
    assert json.loads(json.dumps(jlora.PrefixTuning(4, projection_hidden=8).to_json())) == {
        "method": "prefix_tuning", "num_virtual_tokens": 4, "projection_hidden": 8, "init": "random", "init_text": None}


# ---------------------------------------------------------------------------------------------
# shapes, structure and the split

SPECS = {
    "prompt": jlora.PromptTuning(5),
    "prefix": jlora.PrefixTuning(5),
    "prefix_mlp": jlora.PrefixTuning(5, projection_hidden=12),
    "ptuning_mlp": jlora.PTuning(5, hidden=10),
    "ptuning_lstm": jlora.PTuning(5, encoder="lstm", hidden=6),
}


def test_apply_shapes_partition_and_kwargs_on_gqa_llama():
    model, params, _ = tiny_llama()
    c = model.config                       # 2 layers, 4 heads, 2 kv heads, head_dim 8, hidden 32
    expect = {
        "prompt": {"prompt_tuning/embedding": (5, 32)},
        "prefix": {"prefix_tuning/embedding": (5, 2, 2, 2, 8)},
        "prefix_mlp": {"prefix_tuning/embedding": (5, 16), "prefix_tuning/transform/0/kernel": (16, 12),
                       "prefix_tuning/transform/0/bias": (12,), "prefix_tuning/transform/2/kernel": (12, 2, 2, 2, 8),
                       "prefix_tuning/transform/2/bias": (2, 2, 2, 8)},
        "ptuning_mlp": {"p_tuning/embedding": (5, 32), **{f"p_tuning/mlp_head/{i}/kernel": s for i, s in
                                                           (("0", (32, 10)), ("2", (10, 10)), ("4", (10, 32)))}},
    }
    for name, spec in SPECS.items():
        adapted = jlora.apply_prompt(params, spec, jax.random.key(0), config=c)
        shapes = {p: tuple(leaf.shape) for p, leaf in      # paths relative to the jlora_prompt entry
                  flatten_with_paths(adapted[jp.PROMPT_KEY], is_leaf=lambda x: isinstance(x, jlora.Trainable))[0]}
        for k, v in expect.get(name, {}).items():
            assert shapes[k] == v, (name, k, shapes)
        trainable, frozen = jlora.partition(adapted)
        assert all(p.startswith(jp.PROMPT_KEY + "/") for p in _trainable_paths(trainable)), name
        n_train = jlora.count(adapted)["trainable"]
        assert n_train == sum(int(np.prod(s)) for s in shapes.values()) and n_train > 0
        kw = jlora.prompt_kwargs(adapted, 3)
        if name.startswith("prefix"):
            assert set(kw) == {"prefix"} and kw["prefix"]["k"].shape == (2, 3, 5, c.num_key_value_heads, c.head_dim)
            assert kw["prefix"]["v"].shape == kw["prefix"]["k"].shape
        else:
            assert set(kw) == {"prompt_embeddings"} and kw["prompt_embeddings"].shape == (3, 5, 32)
        assert jp.num_virtual_tokens(adapted) == 5
    lstm = jlora.apply_prompt(params, SPECS["ptuning_lstm"], config=c)[jp.PROMPT_KEY]["p_tuning"]
    assert sorted(lstm["lstm_head"]) == ["l0", "l0_reverse", "l1", "l1_reverse"]
    assert lstm["lstm_head"]["l1"]["w_ih"].shape == (12, 24) and lstm["mlp_head"]["2"]["kernel"].shape == (12, 32)
    assert jlora.prompt_kwargs(params, 3) == {}   # no prompt: nothing to pass
    # the prefix layout is PEFT's Embedding(P, 2*L*kv_dim): slot 2l is layer l's key, 2l+1 its value
    adapted = jlora.apply_prompt(params, SPECS["prefix"], config=c)
    emb = np.asarray(adapted[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].value)
    peft = emb.reshape(5, 2 * 2, 2, 8)                 # (P, 2L, heads, head_dim) as PEFT's view
    kw = jlora.prompt_kwargs(adapted, 1)
    np.testing.assert_array_equal(np.asarray(kw["prefix"]["k"][1, 0]), peft[:, 2])
    np.testing.assert_array_equal(np.asarray(kw["prefix"]["v"][1, 0]), peft[:, 3])


def test_init_random_vocab_and_text_copy_the_right_rows():
    model, params, _ = tiny_llama()
    table = np.asarray(params["params"]["model"]["embed_tokens"]["embedding"])
    rand = jlora.apply_prompt(params, jlora.PromptTuning(64), jax.random.key(1), config=model.config)
    r = np.asarray(rand[jp.PROMPT_KEY]["prompt_tuning"]["embedding"].value)
    assert abs(r.std() - 1.0) < 0.05 and abs(r.mean()) < 0.05          # N(0, 1), PEFT's default

    vocab = jlora.apply_prompt(params, jlora.PromptTuning(6, init="vocab"), jax.random.key(2), config=model.config)
    v = np.asarray(vocab[jp.PROMPT_KEY]["prompt_tuning"]["embedding"].value)
    dist = ((v[:, None, :] - table[None]) ** 2).sum(-1)
    assert (dist.min(1) == 0).all()                                      # every row is a vocabulary row
    assert len(set(dist.argmin(1).tolist())) > 1

    class Tok:                                                           # tokenizers.Tokenizer-like
        def encode(self, text):
            return type("E", (), {"ids": [int(w) for w in text.split()]})()

    text = jlora.apply_prompt(params, jlora.PromptTuning(7, init="text", init_text="4 9 33"), config=model.config,
                              tokenizer=Tok())
    t = np.asarray(text[jp.PROMPT_KEY]["prompt_tuning"]["embedding"].value)
    np.testing.assert_array_equal(t, table[[4, 9, 33, 4, 9, 33, 4]])     # repeated (ceil) and cut, as PEFT
    short = jlora.apply_prompt(params, jlora.PromptTuning(2, init="text", init_text="5 6 7"), config=model.config,
                               tokenizer=lambda s: [int(w) for w in s.split()])
    np.testing.assert_array_equal(np.asarray(short[jp.PROMPT_KEY]["prompt_tuning"]["embedding"].value), table[[5, 6]])
    # BERT: the word embeddings are found among three hidden-wide tables
    bp = bert_params()
    b = jlora.apply_prompt(bp, jlora.PromptTuning(3, init="text", init_text="1 2 98"), config=BERT_TINY, tokenizer=Tok())
    np.testing.assert_array_equal(np.asarray(b[jp.PROMPT_KEY]["prompt_tuning"]["embedding"].value),
                                  np.asarray(bp["params"]["embeddings"]["word_embeddings"]["embedding"])[[1, 2, 98]])
    with pytest.raises(ValueError, match=r"outside the embedding table \(vocab 99\)"):
        jlora.apply_prompt(bp, jlora.PromptTuning(3, init="text", init_text="1 200"), config=BERT_TINY, tokenizer=Tok())


# ---------------------------------------------------------------------------------------------
# the protocol: prompt embeddings

def test_llama_prompt_embeddings_equal_running_the_concatenated_tokens():
    model, params, fwd = tiny_llama()
    table = params["params"]["model"]["embed_tokens"]["embedding"]
    virtual = np.array([7, 70, 3])
    ids = np.array([[5, 17, 42, 8, 99], [0, 0, 12, 13, 14]], np.int32)       # row 1 left-padded
    mask = np.array([[1] * 5, [0, 0, 1, 1, 1]], np.int32)
    prompt = jnp.broadcast_to(table[virtual], (2, 3, 32))
    got = fwd(params, ids, attention_mask=mask, prompt_embeddings=prompt)
    full_ids = np.concatenate([np.broadcast_to(virtual, (2, 3)), ids], 1)
    full_mask = np.concatenate([np.ones((2, 3), np.int32), mask], 1)
    want = fwd(params, full_ids, attention_mask=full_mask)
    assert got.shape == (2, 8, model.config.vocab_size)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # by hand: without a mask, positions 0..P+T-1 over the concatenated embeddings
    np.testing.assert_allclose(fwd(params, ids[:1], prompt_embeddings=prompt[:1]),
                               fwd(params, full_ids[:1]), atol=1e-5)


def test_bert_prompt_embeddings_equal_running_the_concatenated_tokens():
    params = bert_params()
    fwd = jax.jit(bert.BertModel(BERT_TINY).apply)
    table = params["params"]["embeddings"]["word_embeddings"]["embedding"]
    virtual = np.array([[4, 8], [4, 8]])
    seq, pooled = fwd(params, IDS, MASK, TYPES, prompt_embeddings=table[virtual])
    full = (np.concatenate([virtual, IDS], 1), np.concatenate([np.ones((2, 2), np.int32), MASK], 1),
            np.concatenate([np.zeros((2, 2), np.int32), TYPES], 1))       # PEFT: type 0, mask 1 in front
    want_seq, want_pooled = fwd(params, *full)
    assert seq.shape == (2, 9, 32)
    np.testing.assert_allclose(seq, want_seq, atol=1e-5)
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(2, 2, 31\)"):
        fwd(params, IDS, MASK, TYPES, prompt_embeddings=jnp.zeros((2, 2, 31)))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 64"):
        fwd(params, IDS, MASK, TYPES, prompt_embeddings=jnp.zeros((2, 60, 32)))


# ---------------------------------------------------------------------------------------------
# the protocol: prefixes

def _stack_cache(cache, n, scan):
    layers = cache["layers"]
    k = layers["k"] if scan else jnp.stack([l["k"] for l in layers])
    v = layers["v"] if scan else jnp.stack([l["v"] for l in layers])
    return {"k": k[:, :, :n], "v": v[:, :, :n]}


@pytest.mark.parametrize("scan", [False, True])
def test_llama_prefix_is_what_attention_sees_of_earlier_tokens(scan):
    """A prefix made of the cached keys/values of tokens `a` gives the logits of `b` in the full
    run over `a + b`: positions start at P, the prefix keys are used as given (already rotated)."""
    model, params, fwd = tiny_llama(scan_layers=scan)
    seq = jnp.asarray([[5, 17, 42, 8, 99, 3, 60, 61, 2]])
    full = fwd(params, seq)
    _, cache = fwd(params, seq[:, :4], cache=llama.init_cache(model.config, 1, 4))
    prefix = _stack_cache(cache, 4, scan)
    assert prefix["k"].shape == (2, 1, 4, 2, 8)                              # num_kv_heads = 2 (GQA)
    got = fwd(params, seq[:, 4:], prefix=prefix)
    np.testing.assert_allclose(got, full[:, 4:], atol=1e-5)
    with pytest.raises(ValueError, match=r"prefix\['k'\] has shape \(2, 1, 4, 4, 8\)"):
        fwd(params, seq, prefix={"k": jnp.zeros((2, 1, 4, 4, 8)), "v": jnp.zeros((2, 1, 4, 4, 8))})
    with pytest.raises(ValueError, match="not both"):
        fwd(params, seq, prefix=prefix, cache=llama.init_cache(model.config, 1, 16))


def test_bert_prefix_is_what_attention_sees():
    """One layer: a prefix holding the keys/values that tokens `a` produce gives `b` the same
    outputs as the full run over `a + b` (positions of `b` start at P, the mask covers the prefix)."""
    cfg = BERT_TINY.replace(num_hidden_layers=1)
    params = bert_params(cfg)
    model = bert.BertModel(cfg)
    a, b = IDS[:, :3], IDS[:, 3:]
    full_mask = np.concatenate([np.ones((2, 3), np.int32), MASK[:, 3:]], 1)
    (seq, _), inter = model.apply(params, IDS, full_mask, capture_intermediates=True, mutable=["intermediates"])
    att = inter["intermediates"]["encoder"]["layer_0"]["attention"]["self"]
    split = lambda t: t[:, :3].reshape(2, 3, 4, 8)[None]
    prefix = {"k": split(att["key"]["__call__"][0]), "v": split(att["value"]["__call__"][0])}
    got, _ = model.apply(params, b, MASK[:, 3:], prefix=prefix)
    np.testing.assert_allclose(got[0], seq[0, 3:], atol=1e-5)               # row 0: no padding
    np.testing.assert_allclose(got[1, :1], seq[1, 3:4], atol=1e-5)          # row 1: its one real token
    with pytest.raises(ValueError, match=r"prefix must be a dict with keys 'k' and 'v'"):
        model.apply(params, b, prefix={"key": prefix["k"]})


def _greedy_recompute(fwd, params, ids, steps, **kw):
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(jnp.argmax(fwd(params, jnp.asarray([seq]), **kw)[0, -1])))
    return np.asarray(seq[len(ids):])


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_llama_generation_with_kv_cache_equals_full_recompute(kind):
    model, params, fwd = tiny_llama()
    spec = jlora.PrefixTuning(4, projection_hidden=8) if kind == "prefix" else jlora.PTuning(3)
    adapted = jlora.apply_prompt(params, spec, jax.random.key(3), config=model.config)
    kw1 = jlora.prompt_kwargs(adapted, 1)
    prompt_ids = [5, 17, 42, 8, 99, 3]
    ref = _greedy_recompute(fwd, params, prompt_ids, 8, **kw1)
    out = llama.generate(model, params, [prompt_ids], max_new_tokens=8, **kw1)
    np.testing.assert_array_equal(out[0], ref)
    base = llama.generate(model, params, [prompt_ids], max_new_tokens=8)
    assert not np.array_equal(base[0], ref)                                 # the prompt changes the answer
    # a left-padded batch (padding sits between the prompt/prefix and the tokens) gives each row's own answer
    ids = np.array([[0, 0, 0, 7, 3, 9], prompt_ids], np.int32)
    mask = np.array([[0, 0, 0, 1, 1, 1], [1] * 6], np.int32)
    both = llama.generate(model, params, ids, max_new_tokens=8, attention_mask=mask, **jlora.prompt_kwargs(adapted, 2))
    np.testing.assert_array_equal(both[1], ref)
    np.testing.assert_array_equal(both[0], _greedy_recompute(fwd, params, [7, 3, 9], 8, **kw1))


# ---------------------------------------------------------------------------------------------
# gradient checkpointing and scanned layers (PEFT refuses prefixes with gradient checkpointing)

def _prompt_grad(apply_fn, adapted, batch, lm=True):
    trainable, frozen = jlora.partition(adapted)

    def loss(t):
        p = jlora.combine(t, frozen)
        out = apply_fn(p, *batch, **jlora.prompt_kwargs(p, batch[0].shape[0]))
        out = out[0] if isinstance(out, tuple) else out
        return jnp.mean(jnp.tanh(out) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
    return value, grads[jp.PROMPT_KEY]


@pytest.mark.parametrize("spec", [jlora.PrefixTuning(3), jlora.PromptTuning(3)], ids=["prefix", "prompt"])
def test_remat_and_scan_layers_work_with_prompts_llama(spec):
    _, params, _ = tiny_llama()
    plain = llama.LlamaForCausalLM(tiny_llama_config())
    adapted = jlora.apply_prompt(params, spec, jax.random.key(0), config=plain.config)
    batch = (jnp.asarray([[5, 17, 42, 8], [1, 2, 3, 4]]), jnp.asarray([[1, 1, 1, 1], [0, 1, 1, 1]]))
    ref_value, ref_grads = _prompt_grad(plain.apply, adapted, batch)
    for kw in (dict(remat=True), dict(scan_layers=True, remat=True)):
        model = llama.LlamaForCausalLM(tiny_llama_config(**kw))
        p = dict(adapted, params=llama.stack_layers(params)["params"]) if kw.get("scan_layers") else adapted
        value, grads = _prompt_grad(model.apply, p, batch)
        np.testing.assert_allclose(value, ref_value, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)
        if kw.get("scan_layers"):        # the remat is really there
            trainable, frozen = jlora.partition(p)
            jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(model.apply(
                jlora.combine(t, frozen), batch[0], **jlora.prompt_kwargs(jlora.combine(t, frozen), 2)))))(trainable))
            assert "remat" in jaxpr or "checkpoint" in jaxpr
    assert float(jnp.abs(jax.tree_util.tree_leaves(ref_grads)[0]).sum()) > 0


def test_remat_and_scan_layers_work_with_prefixes_bert():
    params = bert_params()
    adapted = jlora.apply_prompt(params, jlora.PrefixTuning(3, projection_hidden=6), jax.random.key(0), config=BERT_TINY)
    batch = (IDS, MASK, TYPES)
    ref_value, ref_grads = _prompt_grad(bert.BertForSequenceClassification(BERT_TINY).apply, adapted, batch)
    cfg = BERT_TINY.replace(scan_layers=True, remat=True)
    scanned = dict(adapted, params=bert.stack_layers(params)["params"])
    value, grads = _prompt_grad(bert.BertForSequenceClassification(cfg).apply, scanned, batch)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads, ref_grads)
    # jax.checkpoint around the whole lifted forward too
    lifted = jlora.lift(bert.BertForSequenceClassification(BERT_TINY).apply)
    value2, grads2 = _prompt_grad(jax.checkpoint(lambda p, *a, **k: lifted(p, *a, **k)), adapted, batch)
    np.testing.assert_allclose(value2, ref_value, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# training, export, checkpoints

@pytest.mark.parametrize("name", ["prompt", "prefix_mlp", "ptuning_lstm"])
def test_training_step_changes_only_the_prompt(name):
    params = bert_params()
    adapted = jlora.apply_prompt(params, SPECS[name], jax.random.key(0), config=BERT_TINY)
    forward = jlora.lift(bert.BertForSequenceClassification(BERT_TINY).apply)
    batch = {"ids": IDS, "mask": MASK, "types": TYPES, "labels": np.array([0, 2], np.int32)}

    def loss_fn(p, batch, key):
        logits = forward(p, batch["ids"], batch["mask"], batch["types"], **jlora.prompt_kwargs(p, 2))
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    optimizer = optax.adam(1e-2)
    trainable, frozen = jlora.partition(adapted)
    step = jlora.train.make_step(loss_fn, optimizer)
    opt_state = optimizer.init(trainable)
    before = jax.tree_util.tree_map(np.asarray, adapted)
    losses = []
    for i in range(3):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    after = jlora.combine(trainable, frozen)
    assert losses[-1] < losses[0]
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, after["params"]),
                           before["params"])                                # the model is untouched
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     after[jp.PROMPT_KEY], before[jp.PROMPT_KEY])
    assert all(jax.tree_util.tree_leaves(changed)), changed                 # every prompt leaf trains


@pytest.mark.parametrize("name", ["prefix_mlp", "ptuning_lstm", "prompt"])
def test_export_drops_reparameterisation_and_save_load_round_trips(tmp_path, name):
    model, params, fwd = tiny_llama()
    spec = SPECS[name]
    adapted = jlora.apply_prompt(params, spec, jax.random.key(5), config=model.config)
    ids = jnp.asarray([[5, 17, 42, 8]])
    want = fwd(params, ids, **jlora.prompt_kwargs(adapted, 1))
    exported = jlora.export_prompt(adapted)
    leaves = _trainable_paths(exported)
    if name == "prefix_mlp":       # Li & Liang: only the final (P, L, 2, kv_heads, head_dim) keys/values remain
        assert leaves == [f"{jp.PROMPT_KEY}/prefix_tuning/embedding"]
        assert exported[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].shape == (5, 2, 2, 2, 8)
    elif name == "ptuning_lstm":   # the encoder's output becomes a plain prompt
        assert leaves == [f"{jp.PROMPT_KEY}/prompt_tuning/embedding"]
    else:
        assert exported is adapted
    np.testing.assert_allclose(fwd(params, ids, **jlora.prompt_kwargs(exported, 1)), want, atol=1e-5)

    path = jlora.io.save_adapter(str(tmp_path / "adapter"), exported, spec=spec)
    meta = json.loads(open(os.path.join(path, "jlora_adapter.json")).read())
    assert [t["path"] for t in meta["trainables"]] == leaves and meta["spec"]["method"] == spec.method
    restored = jlora.load_prompt_adapter(path, params)                     # plain params: the prompt is added
    np.testing.assert_allclose(fwd(params, ids, **jlora.prompt_kwargs(restored, 1)), want, atol=1e-5)
    assert _trainable_paths(restored) == leaves
    # the stock loader works onto a tree that already has the slots
    again = jlora.io.load_adapter(path, jlora.export_prompt(jlora.apply_prompt(params, spec, jax.random.key(9),
                                                                               config=model.config)))
    np.testing.assert_allclose(fwd(params, ids, **jlora.prompt_kwargs(again, 1)), want, atol=1e-5)


def test_prompt_combines_with_lora_and_survives_training_state_checkpoint(tmp_path):
    model, params, _ = tiny_llama()
    adapted = jlora.apply(params, jlora.LoRA(rank=2, targets=llama.DEFAULT_TARGETS["default"]), jax.random.key(0))
    adapted = jlora.apply_prompt(adapted, jlora.PrefixTuning(2), jax.random.key(1), config=model.config)
    trainable, frozen = jlora.partition(adapted)
    paths = _trainable_paths(trainable)
    assert paths == [f"{jp.PROMPT_KEY}/prefix_tuning/embedding"]            # + LoRA factors inside nodes
    assert jlora.count(adapted)["trainable"] == 2 * 2 * 2 * 2 * 8 + 2 * (32 * 2 + 2 * 32 + 32 * 2 + 2 * 16)
    manager = jlora.io.checkpoint_manager(str(tmp_path / "state"))
    opt = optax.adam(1e-3)
    jlora.io.save_state(manager, 1, trainable, opt.init(trainable), jax.random.key(0))
    manager.wait_until_finished()
    restored = jlora.io.restore_state(manager, trainable, opt.init(trainable), jax.random.key(0))
    np.testing.assert_array_equal(restored.trainable[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].value,
                                  trainable[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].value)
    manager.close()
    lifted = jlora.lift(model.apply)
    out = lifted(adapted, jnp.asarray([[1, 2, 3]]), **jlora.prompt_kwargs(adapted, 1))
    assert out.shape == (1, 3, model.config.vocab_size) and bool(jnp.all(jnp.isfinite(out)))


def test_ptuning_lstm_matches_torch_bidirectional_lstm():
    import torch
    rng = np.random.default_rng(0)
    d, h, T = 6, 5, 4
    lstm = torch.nn.LSTM(d, h, num_layers=2, bidirectional=True, batch_first=True)
    ours = {}
    for layer in range(2):
        for suffix in ("", "_reverse"):
            g = lambda n: getattr(lstm, f"{n}_l{layer}{suffix}").detach().numpy()
            ours[f"l{layer}{suffix}"] = {"w_ih": g("weight_ih").T, "w_hh": g("weight_hh").T,
                                         "b_ih": g("bias_ih"), "b_hh": g("bias_hh")}
    x = rng.standard_normal((T, d)).astype(np.float32)
    want = lstm(torch.from_numpy(x)[None])[0][0].detach().numpy()
    got = jp.bidirectional_lstm(jax.tree_util.tree_map(jnp.asarray, ours), jnp.asarray(x))
    assert got.shape == (T, 2 * h)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_readme_prompt_section_snippet_runs(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Prompt tuning, prefix tuning, P-tuning", 1)[1].split("\n## ", 1)[0]
    block, = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    scope = {"__name__": "readme_prompt"}
    exec(compile(block, "README.md", "exec"), scope)
    assert "[[" in capsys.readouterr().out                                  # the generated ids were printed
    trained = scope["adapted"]["jlora_prompt"]["prefix_tuning"]["embedding"].value
    initial = jlora.apply_prompt(scope["params"], scope["spec"], jax.random.key(1), config=scope["config"])
    assert not np.allclose(trained, initial["jlora_prompt"]["prefix_tuning"]["embedding"].value)
    np.testing.assert_array_equal(scope["restored"]["jlora_prompt"]["prefix_tuning"]["embedding"].value, trained)


@pytest.mark.parametrize("scan", [False, True])
def test_prefix_init_from_tokens_equals_running_those_tokens_first(scan):
    """PrefixTuning(init="text" | "vocab") starts as the keys/values of real tokens: the adapted
    model's logits are those of the base model run on ``text + input`` (Li & Liang's remedy for
    random N(0, 1) prefixes, which start far off a trained model's key/value scale)."""
    model, params, fwd = tiny_llama(scan_layers=scan)
    c = model.config
    text_ids = [7, 70, 3]
    tok = lambda text: text_ids                                   # a tokenizer as a function text -> ids
    spec = jlora.PrefixTuning(5, init="text", init_text="abc")
    adapted = jlora.apply_prompt(params, spec, jax.random.key(0), config=c, tokenizer=tok, model=model)
    emb = adapted[jp.PROMPT_KEY]["prefix_tuning"]["embedding"]
    assert isinstance(emb, jlora.Trainable) and emb.shape == (5, 2, 2, 2, 8)
    ids = jnp.asarray([[5, 17, 42, 8]])
    got = fwd(adapted, ids, **jlora.prompt_kwargs(adapted, 1))
    full = fwd(params, jnp.asarray([[7, 70, 3, 7, 70, 5, 17, 42, 8]]))      # text repeated and cut to P = 5
    np.testing.assert_allclose(got, full[:, 5:], atol=1e-5)
    # vocab: P uniformly drawn ids, the same rule and key as PromptTuning(init="vocab")
    vspec = jlora.PrefixTuning(4, init="vocab")
    vocab = jlora.apply_prompt(params, vspec, jax.random.key(1), config=c, model=model)
    want_ids = jp.prompt_init_ids(vspec, c.vocab_size, jax.random.split(jax.random.key(1))[0])
    np.testing.assert_allclose(vocab[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].value,
                               jp.token_prefix(model, params, want_ids), atol=1e-6)
    # it trains like any prefix
    trainable, frozen = jlora.partition(vocab)
    g = jax.grad(lambda t: jnp.sum(fwd(jlora.combine(t, frozen), ids, **jlora.prompt_kwargs(jlora.combine(t, frozen), 1))[0, -1] ** 2))(trainable)
    assert float(jnp.abs(g[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].value).max()) > 0


def test_prefix_init_validation():
    model, params, _ = tiny_llama()
    with pytest.raises(ValueError, match="PrefixTuning.init must be one of"):
        jlora.PrefixTuning(4, init="tokens")
    with pytest.raises(ValueError, match="does not combine with projection_hidden"):
        jlora.PrefixTuning(4, projection_hidden=8, init="vocab")
    with pytest.raises(ValueError, match="needs a non-empty init_text"):
        jlora.PrefixTuning(4, init="text")
    with pytest.raises(ValueError, match="only used with init='text'"):
        jlora.PrefixTuning(4, init_text="hi")
    with pytest.raises(ValueError, match="needs model="):
        jlora.apply_prompt(params, jlora.PrefixTuning(4, init="vocab"), config=model.config)
    with pytest.raises(ValueError, match="needs model= a jlora Llama"):
        jlora.apply_prompt(params, jlora.PrefixTuning(4, init="vocab"), config=model.config, model=object())
    assert jlora.PrefixTuning(4).to_json()["init"] == "random"          # PEFT's N(0, 1) stays the default
