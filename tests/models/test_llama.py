"""jlora.models.llama: real SmolLM2 GGUF, HF parity, KV cache, padding, scan layout, LoRA lift."""

import functools
import json
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import assets
from jlora.core.paths import matches
from jlora.models import llama

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.2)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def tiny(**kw):
    return llama.LlamaConfig(**{**TINY, **kw})


def tiny_params(config, seed=0):
    """Random params built in numpy from the model's abstract shapes (no init compile): kernels and
    embeddings N(0, 0.2), norms 1 + N(0, 0.1), biases N(0, 0.1)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in llama._expected_shapes(config.replace(scan_layers=False)).items():
        leaf = path.rsplit("/", 1)[-1]
        x = rng.standard_normal(shape)
        x = 1 + 0.1 * x if leaf == "weight" else (0.1 * x if leaf == "bias" else 0.2 * x)
        flat[path] = jnp.asarray(x, jnp.float32)
    params = llama._unflatten(flat)
    return llama.stack_layers(params) if config.scan_layers else params


@functools.lru_cache(maxsize=None)
def tiny_model(seed=0, **kw):
    """(model, params, jitted apply), shared across tests so compiled code is reused."""
    config = tiny(**kw)
    model = llama.LlamaForCausalLM(config)
    return model, tiny_params(config, seed), jax.jit(model.apply)


# ---------------------------------------------------------------------------------------------
# The real checkpoint (SmolLM2-135M-Instruct, GGUF Q4_1), loaded once

@pytest.fixture(scope="module")
def smol():
    from gguf import GGUFReader

    t0 = time.perf_counter()
    reader = GGUFReader(str(assets.ensure("smollm2") / llama.SMOLLM2_GGUF))
    config, params, tok = llama.load_gguf(reader)
    # the scanned layout compiles ~3x faster than 30 unrolled layers; scan == unrolled is tested below
    model = llama.LlamaForCausalLM(config.replace(scan_layers=True))
    print(f"\nSmolLM2 loaded in {time.perf_counter() - t0:.1f}s")
    return types.SimpleNamespace(reader=reader, config=config, params=params, tok=tok, model=model,
                                 scanned=llama.stack_layers(params))


def test_smollm2_config_and_param_names(smol):
    c = smol.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    p = smol.params["params"]
    assert "lm_head" not in p
    assert p["model"]["embed_tokens"]["embedding"].shape == (49152, 576)
    assert p["model"]["layers_3"]["self_attn"]["q_proj"]["kernel"].shape == (576, 576)
    assert p["model"]["layers_3"]["self_attn"]["k_proj"]["kernel"].shape == (576, 192)
    assert p["model"]["layers_29"]["mlp"]["down_proj"]["kernel"].shape == (1536, 576)
    assert p["model"]["layers_0"]["post_attention_layernorm"]["weight"].shape == (576,)
    assert smol.scanned["params"]["model"]["layers"]["mlp"]["gate_proj"]["kernel"].shape == (30, 576, 1536)


def test_smollm2_answers_paris(smol):
    ids = smol.tok.encode(llama.chat_prompt(QUESTION)).ids
    assert ids[0] == 1 and ids[-4:] == [1, 520, 9531, 198]        # <|im_start|>assistant\n
    out = llama.generate(smol.model, smol.scanned, [ids], max_new_tokens=12, eos_id=smol.config.eos_token_id)
    answer = smol.tok.decode(out[0].tolist(), skip_special_tokens=True)
    print(f"\nSmolLM2 greedy answer: {answer!r}")
    assert "Paris" in answer


def test_tokenizer_round_trips(smol):
    tok = smol.tok
    for s in ["Hello world!", "  12345 café — naïve 🚀\n\ttabs", "def f(x):\n    return x ** 2", "Ünïcødé 日本語"]:
        assert tok.decode(tok.encode(s).ids) == s
    assert tok.encode("<|im_start|>").ids == [1] and tok.encode("<|im_end|>").ids == [2]
    assert tok.encode("Hello").ids == [19556]                      # no prefix space added
    assert llama.chat_prompt(QUESTION) == \
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert llama.chat_prompt(QUESTION, add_generation_prompt=False, system="Be brief.") == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"


def _interleaved_rope(x, pos, theta):
    """RoPE on interleaved pairs (x[2i], x[2i+1]): what llama.cpp runs on the permuted GGUF rows."""
    D = x.shape[-1]
    a = pos[:, None] * (1.0 / (theta ** (np.arange(0, D, 2) / D)))[None]
    c, s = np.cos(a)[:, None], np.sin(a)[:, None]
    o = np.empty_like(x)
    o[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    o[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return o


def _reference_forward(W, ids, c):
    """The float64 numpy Llama forward of offline-assets §5, on the raw (permuted) GGUF weights."""
    H, KV, D, T = c.num_attention_heads, c.num_key_value_heads, c.head_dim, len(ids)
    w = lambda name: W[name].astype(np.float64)                                  # noqa: E731
    rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * g  # noqa: E731
    x = w("token_embd.weight")[ids]
    pos = np.arange(T, dtype=np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(c.num_hidden_layers):
        b = f"blk.{layer}."
        h = rms(x, w(b + "attn_norm.weight"))
        q = _interleaved_rope((h @ w(b + "attn_q.weight").T).reshape(T, H, D), pos, c.rope_theta)
        k = np.repeat(_interleaved_rope((h @ w(b + "attn_k.weight").T).reshape(T, KV, D), pos, c.rope_theta), H // KV, 1)
        v = np.repeat((h @ w(b + "attn_v.weight").T).reshape(T, KV, D), H // KV, 1)
        a = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D) + mask
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", a, v).reshape(T, H * D) @ w(b + "attn_output.weight").T
        h = rms(x, w(b + "ffn_norm.weight"))
        g = h @ w(b + "ffn_gate.weight").T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w(b + "ffn_up.weight").T)) @ w(b + "ffn_down.weight").T
    return rms(x, w("output_norm.weight")) @ w("token_embd.weight").T


def test_gguf_logits_match_numpy_reference_on_permuted_weights(smol):
    from gguf.quants import dequantize

    W = {t.name: np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed(t.shape.tolist())))
         for t in smol.reader.tensors}
    ids = smol.tok.encode("<|im_start|>user\nName a prime number.<|im_end|>").ids
    ref = _reference_forward(W, np.asarray(ids), smol.config)
    ours = np.asarray(jax.jit(smol.model.apply)(smol.scanned, jnp.asarray([ids]))[0], np.float64)
    err = float(np.max(np.abs(ours - ref)))
    print(f"\nGGUF logits vs numpy interleaved-RoPE reference: max |diff| = {err:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert err < 1e-3
    assert np.array_equal(ours.argmax(-1), ref.argmax(-1))


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)

    def hf_to_gguf(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute, verbatim
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))

    for n_head, D, fan_in in [(9, 64, 20), (3, 8, 5), (1, 4, 3)]:
        w = rng.standard_normal((n_head * D, fan_in))
        assert np.array_equal(llama.gguf_permute(w, n_head), hf_to_gguf(w, n_head))
        assert np.array_equal(llama.gguf_unpermute(hf_to_gguf(w, n_head), n_head), w)
        assert np.array_equal(hf_to_gguf(llama.gguf_unpermute(w, n_head), n_head), w)
        b = rng.standard_normal(n_head * D)                      # 1-D (bias) too
        assert np.array_equal(llama.gguf_unpermute(hf_to_gguf(b, n_head), n_head), b)
        # interleaved RoPE on the permuted rows == the same permutation of half-split RoPE on HF rows
        T = 5
        x = rng.standard_normal((T, fan_in))
        pos = np.arange(T, dtype=np.float64)
        q_gguf = _interleaved_rope((x @ hf_to_gguf(w, n_head).T).reshape(T, n_head, D), pos, 1e4)
        cos, sin = llama.rope_cos_sin(jnp.asarray(pos[None]), D, 1e4)
        q_hf = llama.apply_rope(jnp.asarray((x @ w.T).reshape(1, T, n_head, D), jnp.float32), cos, sin)[0]
        back = llama.gguf_unpermute(q_gguf.reshape(T, n_head * D).T, n_head).T.reshape(T, n_head, D)
        np.testing.assert_allclose(back, np.asarray(q_hf), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# KV cache, padding and sampling (tiny random configs)

def _greedy_recompute(fwd, params, prompt, n):
    """Greedy decoding by re-running the whole sequence every step (no cache), one compile."""
    T = len(prompt)
    buf = np.zeros((1, T + n), np.int32)
    buf[0, :T] = prompt
    for t in range(T, T + n):  # causal: the right-hand zeros cannot affect position t-1
        buf[0, t] = int(np.argmax(np.asarray(fwd(params, jnp.asarray(buf))[0, t - 1])))
    return buf[0, T:]


def test_cached_generation_equals_full_recompute():
    model, params, fwd = tiny_model()
    prompt = [5, 17, 42, 8, 99, 3]
    ref = _greedy_recompute(fwd, params, prompt, 10)
    out = llama.generate(model, params, [prompt], max_new_tokens=10)
    np.testing.assert_array_equal(out[0], ref)
    # logits: prefill 8 tokens into a cache, then 8 more == one uncached forward over all 16
    seq = jnp.asarray([prompt + ref.tolist()])
    full = fwd(params, seq)
    cache = llama.init_cache(model.config, 1, 16)
    first, cache = fwd(params, seq[:, :8], cache=cache)
    second, cache = fwd(params, seq[:, 8:], cache=cache)
    np.testing.assert_allclose(np.concatenate([first, second], 1), full, atol=1e-5)
    assert int(cache["index"]) == 16 and int(cache["mask"].sum()) == 16
    # eos stops a row and the rest is padding
    eos = int(ref[3])
    first_eos = int(np.argmax(ref == eos))
    stopped = llama.generate(model, params, [prompt], max_new_tokens=10, eos_id=eos, pad_id=0)[0]
    np.testing.assert_array_equal(stopped[:first_eos + 1], ref[:first_eos + 1])
    assert (stopped[first_eos + 1:] == 0).all()


def test_left_padded_batch_equals_unpadded_generation():
    model, params, fwd = tiny_model(seed=1, scan_layers=True)
    prompts = [[7, 3, 9], [11, 12, 13, 14, 15, 16, 17], [40, 50, 60, 70, 80]]
    T = max(map(len, prompts))
    ids = np.zeros((3, T), np.int32)
    mask = np.zeros((3, T), np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    batch = llama.generate(model, params, ids, max_new_tokens=8, attention_mask=mask)
    for i, p in enumerate(prompts):
        np.testing.assert_array_equal(batch[i], llama.generate(model, params, [p], max_new_tokens=8)[0])
    # the left-padded forward gives each row's own logits at its real tokens (reference: the row
    # alone, right-padded, which a causal model cannot see)
    logits = fwd(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    for i, p in enumerate(prompts):
        alone = fwd(params, jnp.asarray([p + [0] * (T - len(p))]))[0, :len(p)]
        np.testing.assert_allclose(logits[i, T - len(p):], alone, atol=1e-5)
    with pytest.raises(ValueError, match="LEFT-padded"):
        llama.generate(model, params, ids[:, ::-1], max_new_tokens=2, attention_mask=mask[:, ::-1])


@pytest.mark.parametrize("kv_heads,window", [(2, None), (4, None), (1, 3)], ids=["gqa", "mha", "mqa-window"])
def test_dot_product_attention_equals_the_explicit_softmax(kv_heads, window):
    """attention="xla" (jax.nn.dot_product_attention) gives the explicit path's logits, gradients
    and cached generation: causal, left padding, GQA / MHA / MQA, a sliding window, a deep prefix,
    virtual-token prompts, and LoRA through lift."""
    kw = dict(num_key_value_heads=kv_heads, sliding_window=window)
    config = tiny(**kw)
    params = tiny_params(config, seed=3)
    explicit = jax.jit(llama.LlamaForCausalLM(config).apply)
    fused_model = llama.LlamaForCausalLM(config.replace(attention="xla"))
    fused = jax.jit(fused_model.apply)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 101, (3, 9)))
    mask = jnp.asarray([[1] * 9, [0, 0] + [1] * 7, [0] * 5 + [1] * 4])
    np.testing.assert_allclose(fused(params, ids), explicit(params, ids), atol=2e-5)
    np.testing.assert_allclose(fused(params, ids, attention_mask=mask), explicit(params, ids, attention_mask=mask),
                               atol=2e-5)
    prefix = {"k": jnp.asarray(rng.standard_normal((2, 3, 2, kv_heads, 8)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal((2, 3, 2, kv_heads, 8)), jnp.float32)}
    np.testing.assert_allclose(fused(params, ids, prefix=prefix), explicit(params, ids, prefix=prefix), atol=2e-5)
    prompt = jnp.asarray(rng.standard_normal((3, 2, 32)), jnp.float32)
    np.testing.assert_allclose(fused(params, ids, prompt_embeddings=prompt),
                               explicit(params, ids, prompt_embeddings=prompt), atol=2e-5)
    # a KV cache (prefill, then one token at a time) and greedy generation
    np.testing.assert_array_equal(llama.generate(fused_model, params, [[5, 17, 42, 8]], max_new_tokens=6),
                                  llama.generate(llama.LlamaForCausalLM(config), params, [[5, 17, 42, 8]],
                                                 max_new_tokens=6))
    # gradients of LoRA factors through lift
    adapted = jlora.apply(params, jlora.LoRA(rank=2, targets=llama.DEFAULT_TARGETS["all-linear"]),
                          key=jax.random.key(0))
    adapted = _randomize_factors(adapted)
    trainable, frozen = jlora.partition(adapted)

    def loss(fn):
        return lambda t: jnp.mean(jlora.lift(fn)(jlora.combine(t, frozen), ids, attention_mask=mask) ** 2)

    g_fused = jax.grad(loss(fused_model.apply))(trainable)
    g_explicit = jax.grad(loss(llama.LlamaForCausalLM(config).apply))(trainable)
    for a, b in zip(jax.tree_util.tree_leaves(g_fused), jax.tree_util.tree_leaves(g_explicit)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="attention must be one of \\('explicit', 'xla', 'cudnn'\\), got 'flash'"):
        tiny(attention="flash")


def test_fused_attention_gets_the_causal_triangle_as_is_causal(monkeypatch):
    """Without a cache the fused paths pass the causal triangle (and a sliding window) as
    ``is_causal`` / ``local_window_size`` and only padding and segments as a mask, so cuDNN can skip
    the blocks above the diagonal; cuDNN's mask is the whole (B, 1, T, S). A cache or a prefix keeps
    the full mask. The "cudnn" configuration's arguments run here through the XLA implementation and
    give the explicit path's logits."""
    calls = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, **kw):
        calls.append({"T": q.shape[1], "S": k.shape[1], "mask": None if kw.get("mask") is None else kw["mask"].shape,
                      **{n: kw.get(n) for n in ("is_causal", "local_window_size", "implementation")}})
        return real(q, k, v, **{**kw, "implementation": "xla"})

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    config = tiny(num_key_value_heads=2, sliding_window=4)
    params = tiny_params(config, seed=4)
    explicit = llama.LlamaForCausalLM(config)
    rng = np.random.default_rng(2)
    ids = jnp.asarray(rng.integers(0, 101, (2, 7)))
    right = jnp.asarray([[1] * 7, [1] * 4 + [0] * 3])
    left = jnp.asarray([[1] * 7, [0] * 3 + [1] * 4])
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 2, 3, 3]])
    prefix = {"k": jnp.asarray(rng.standard_normal((2, 2, 2, 2, 8)), jnp.float32),
              "v": jnp.asarray(rng.standard_normal((2, 2, 2, 2, 8)), jnp.float32)}
    cases = [({}, None), ({"attention_mask": right}, (2, 1, 1, 7)), ({"attention_mask": left}, (2, 1, 1, 7)),
             ({"segment_ids": segments}, (2, 1, 7, 7)), ({"prefix": prefix}, "full")]
    for implementation in ("xla", "cudnn"):
        fused = llama.LlamaForCausalLM(config.replace(attention=implementation, scan_layers=False))
        for kw, mask in cases:
            calls.clear()
            np.testing.assert_allclose(fused.apply(params, ids, **kw), explicit.apply(params, ids, **kw),
                                       atol=2e-5, err_msg=f"{implementation} {sorted(kw)}")
            assert len(calls) == config.num_hidden_layers and calls[0]["implementation"] == implementation
            call = calls[0]
            if mask == "full":   # the prefix's slots come first: the diagonal is shifted
                assert call["is_causal"] is None and call["mask"] == (2, 1, 7, 9), call
                continue
            if implementation == "cudnn" and mask is not None:
                mask = (2, 1, 7, 7)
            assert call["is_causal"] is True and call["local_window_size"] == (3, 0), call
            assert call["mask"] == mask, (kw, call)


def test_sampling_is_seeded_and_respects_top_k():
    model, params, fwd = tiny_model()          # same shapes as the cache test: compiled code is reused
    prompt = [1, 2, 3, 4, 5, 6]
    kw = dict(max_new_tokens=10, temperature=1.5, top_k=3)
    a = llama.generate(model, params, [prompt], seed=0, **kw)
    np.testing.assert_array_equal(a, llama.generate(model, params, [prompt], seed=0, **kw))
    assert not np.array_equal(a, llama.generate(model, params, [prompt], seed=1, **kw))
    greedy = _greedy_recompute(fwd, params, prompt, 10)
    assert not np.array_equal(a[0], greedy)
    logits = np.asarray(fwd(params, jnp.asarray([prompt + a[0].tolist()]))[0])   # teacher-forced
    for t, tok in enumerate(a[0]):
        assert tok in np.argsort(logits[len(prompt) - 1 + t])[-3:]


# ---------------------------------------------------------------------------------------------
# Layouts, names, LoRA

def test_scan_layers_equals_unrolled_and_converters_round_trip():
    model, params, fwd = tiny_model(seed=3)
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
    ref = fwd(params, ids)
    stacked = llama.stack_layers(params)
    assert stacked["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 32)
    assert "layers_0" not in stacked["params"]["model"]
    for kw in (dict(scan_layers=True), dict(scan_layers=True, remat=True)):
        out = jax.jit(llama.LlamaForCausalLM(model.config.replace(**kw)).apply)(stacked, ids)
        np.testing.assert_allclose(out, ref, atol=1e-5)
    back = llama.unstack_layers(stacked)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    init_scanned = jax.eval_shape(llama.LlamaForCausalLM(model.config.replace(scan_layers=True)).init_params)
    assert jax.tree_util.tree_structure(init_scanned) == jax.tree_util.tree_structure(stacked)
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(init_scanned), jax.tree_util.tree_leaves(stacked)))


def test_hf_module_names_and_default_targets():
    assert llama.hf_module_name("params/model/layers_3/self_attn/q_proj/kernel") == \
        "base_model.model.model.layers.3.self_attn.q_proj"
    assert llama.hf_module_name("params/model/layers/mlp/down_proj/kernel", layer=7, prefix="") == \
        "model.layers.7.mlp.down_proj"
    assert llama.hf_module_name("params/lm_head/kernel") == "base_model.model.lm_head"
    assert llama.hf_param_name("params/model/embed_tokens/embedding") == "model.embed_tokens.weight"
    assert llama.hf_param_name("params/model/layers_0/input_layernorm/weight") == "model.layers.0.input_layernorm.weight"
    with pytest.raises(ValueError, match="layer=i"):
        llama.hf_module_name("params/model/layers/self_attn/q_proj/kernel")
    paths = [p for p in llama._expected_shapes(tiny())]
    default = {p for p in paths if matches(p, [llama.DEFAULT_TARGETS["default"]])}
    linear = {p for p in paths if matches(p, [llama.DEFAULT_TARGETS["all-linear"]])}
    assert len(default) == 4 and all("q_proj" in p or "v_proj" in p for p in default)
    assert len(linear) == 14 and "params/lm_head/kernel" in paths and "params/lm_head/kernel" not in linear


def _randomize_factors(adapted, seed=0):
    rng = np.random.default_rng(seed)

    def fill(node):
        if not jlora.is_node(node):
            return node
        rand = lambda v: jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype)  # noqa: E731
        return node.with_(a={n: rand(v) for n, v in node.a.items()}, b={n: rand(v) for n, v in node.b.items()})
    return jax.tree_util.tree_map(fill, adapted, is_leaf=jlora.is_node)


@pytest.mark.parametrize("scan,tied", [(True, False), (False, True)], ids=["scanned-untied", "unrolled-tied"])
def test_lora_all_linear_lifted_equals_merged(scan, tied):
    model, params, fwd = tiny_model(seed=4, scan_layers=scan, tie_word_embeddings=tied)
    config = model.config
    ids = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    spec = jlora.LoRA(rank=4, alpha=8, targets=llama.DEFAULT_TARGETS["all-linear"])
    adapted = _randomize_factors(jlora.apply(params, spec, jax.random.key(0), model=model.apply, example=(ids,)))
    nodes = [n for n in jax.tree_util.tree_leaves(adapted, is_leaf=jlora.is_node) if jlora.is_node(n)]
    assert len(nodes) == (7 if scan else 14) and not any("lm_head" in n.path for n in nodes)
    if scan:
        q = next(n for n in nodes if n.path.endswith("q_proj/kernel"))
        assert q.a["default"].shape == (2, 32, 4) and q.b["default"].shape == (2, 4, 32)
    merged = jlora.merge(adapted)
    lifted = jlora.lift(model.apply, strict=True)(adapted, ids)
    ref = fwd(merged, ids)
    assert not np.allclose(ref, fwd(params, ids), atol=1e-2)     # the adapters do change the output
    np.testing.assert_allclose(lifted, ref, atol=1e-4, rtol=1e-4)

    bf16 = llama.LlamaForCausalLM(config.replace(dtype=jnp.bfloat16))
    out16 = jlora.lift(bf16.apply, strict=True)(adapted, ids)
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), ref, atol=0.1 * float(np.abs(ref).max()))


# ---------------------------------------------------------------------------------------------
# HF parity (torch-gated) and loader / config errors

def _hf_model(kind, tied=False, bias=False):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=tied, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    elif kind == "mistral":  # sliding window 4 < the 11-token test sequence
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=4, head_dim=8, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(attention_bias=bias, **common))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model.eval(), torch


@pytest.mark.parametrize("kind,tied,bias", [("llama", False, False), ("llama", True, False), ("llama", False, True),
                                            ("qwen2", False, True), ("mistral", False, False)],
                         ids=["llama-untied", "llama-tied", "llama-attention_bias", "qwen2", "mistral-sliding"])
def test_hf_parity(tmp_path, kind, tied, bias):
    hf, torch = _hf_model(kind, tied, bias)
    from safetensors.torch import save_file

    save_file({k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict(), default=str))
    model, params, tok = llama.load_pretrained(str(tmp_path))
    assert tok is None and model.config.tie_word_embeddings == tied
    assert ("lm_head" in params["params"]) == (not tied)
    if kind == "qwen2":
        assert model.config.attention_bias and not model.config.attention_out_bias
        assert "bias" in params["params"]["model"]["layers_0"]["self_attn"]["q_proj"]
        assert "bias" not in params["params"]["model"]["layers_0"]["self_attn"]["o_proj"]
    if kind == "mistral":
        assert model.config.sliding_window == 4
    ids = np.random.default_rng(0).integers(0, 101, (2, 11))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jax.jit(model.apply)(params, jnp.asarray(ids)))
    err = float(np.abs(ours - ref).max())
    print(f"\nHF {kind} tied={tied} bias={bias}: max |logit diff| = {err:.2e} (max |logit| {np.abs(ref).max():.1f})")
    assert err < 1e-4
    if kind == "llama" and not tied and not bias:     # the scanned layout loads the same weights
        scanned_cfg = model.config.replace(scan_layers=True)
        scanned = llama.load_hf_params(tmp_path / "model.safetensors", scanned_cfg)
        out = jax.jit(llama.LlamaForCausalLM(scanned_cfg).apply)(scanned, jnp.asarray(ids))
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_loader_errors_name_tensors_and_shapes():
    config = tiny()
    params = tiny_params(config)
    flat = {llama.hf_param_name(p): (np.asarray(v).T if p.endswith("kernel") else np.asarray(v))
            for p, v in llama._flatten(params).items()}
    rebuilt = llama.params_from_hf_tensors(flat, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, rebuilt, params)
    bad = dict(flat)
    bad["model.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(llama.CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: checkpoint \(32, 32\) "
                                                    r"!= expected \(16, 32\)"):
        llama.params_from_hf_tensors(bad, config)
    missing = {k: v for k, v in flat.items() if k != "model.norm.weight"}
    with pytest.raises(llama.CheckpointError, match=r"missing: model\.norm\.weight \(expected \(32\)\)"):
        llama.params_from_hf_tensors(missing, config)
    with pytest.raises(llama.CheckpointError, match=r"unexpected: model\.layers\.0\.self_attn\.rotary\.foo"):
        llama.params_from_hf_tensors({**flat, "model.layers.0.self_attn.rotary.foo": np.zeros(3)}, config)
    with pytest.raises(llama.CheckpointError, match=r"lm_head\.weight"):     # untied config, tied checkpoint
        llama.params_from_hf_tensors({k: v for k, v in flat.items() if k != "lm_head.weight"}, config)


def test_config_validation_and_from_hf():
    c = llama.LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, intermediate_size=8, vocab_size=9)
    assert c.head_dim == 16 and c.num_key_value_heads == 4 and c.attention_out_bias is False
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="hidden_size"):
        tiny(hidden_size=-4)
    with pytest.raises(ValueError, match="head_dim"):
        tiny(head_dim=7)
    hf = {**TINY, "model_type": "llama", "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}, "head_dim": None}
    assert llama.LlamaConfig.from_hf(hf).rope_theta == 5e5
    assert llama.LlamaConfig.from_hf(hf, scan_layers=True, dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="rope_type='llama3'"):
        llama.LlamaConfig.from_hf({**hf, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(ValueError, match="model_type='bert'"):
        llama.LlamaConfig.from_hf({**hf, "model_type": "bert"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        llama.LlamaConfig.from_hf({**hf, "num_attention_heads": 0})
    mistral = llama.LlamaConfig.from_hf({**hf, "model_type": "mistral", "sliding_window": 4})
    assert mistral.sliding_window == 4


# ---------------------------------------------------------------------------------------------
# check_inputs: out-of-range token ids raise on the host instead of giving NaN / wrong logits

def test_check_inputs_names_out_of_range_ids_and_their_position():
    config = tiny()                                            # vocab_size 101
    good = np.array([[0, 5, 100], [7, 8, 9]], np.int32)
    mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    llama.check_inputs(config, good)
    llama.check_inputs(config, good, mask)
    llama.check_inputs(config, good.tolist(), mask.astype(bool))   # nested lists, bool masks
    llama.check_inputs(config, jnp.asarray(good), jnp.asarray(mask))  # concrete jax arrays

    at_vocab = good.copy()
    at_vocab[1, 2] = 101                                       # == vocab_size: NaN logits unchecked
    with pytest.raises(ValueError, match=r"input_ids\[1, 2\] = 101 is out of range: valid ids are "
                                         r"\[0, vocab_size\) = \[0, 101\)"):
        llama.check_inputs(config, at_vocab, mask)
    negative = good.copy()
    negative[0, 1], negative[1, 0] = -3, 500                   # the first one (row-major) is named
    with pytest.raises(ValueError, match=r"input_ids\[0, 1\] = -3 is out of range.*\[0, 101\) "
                                         r"\(2 out-of-range ids in all\)"):
        llama.check_inputs(config, negative)

    with pytest.raises(ValueError, match=r"attention_mask\[1, 0\] = 2 is not 0 or 1"):
        llama.check_inputs(config, good, np.array([[0, 1, 1], [2, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 2\), input_ids \(2, 3\)"):
        llama.check_inputs(config, good, mask[:, 1:])
    with pytest.raises(ValueError, match=r"input_ids must be 2-D \(batch, seq\), got shape \(3,\)"):
        llama.check_inputs(config, good[0])
    with pytest.raises(TypeError, match="input_ids must hold integers, got dtype float32"):
        llama.check_inputs(config, good.astype(np.float32))
    with pytest.raises(TypeError, match="jax tracer.*host-side check.*before jax.jit"):
        jax.jit(lambda ids: llama.check_inputs(config, ids))(good)


def test_generate_rejects_out_of_range_prompt_ids():
    model, params, _ = tiny_model()                            # the check runs before anything compiles
    for bad in (101, -1):
        with pytest.raises(ValueError, match=rf"llama.generate: input_ids\[0, 2\] = {bad} is out of range"):
            llama.generate(model, params, [[5, 17, bad, 8]], max_new_tokens=3)
    ids = np.array([[0, 7, 3], [4, 5, 6]], np.int32)
    with pytest.raises(ValueError, match=r"attention_mask\[0, 0\] = 3 is not 0 or 1"):
        llama.generate(model, params, ids, max_new_tokens=3, attention_mask=np.array([[3, 1, 1], [1, 1, 1]]))


def test_hf_checkpoints_load_tensor_by_tensor_in_the_dtype_asked_for(tmp_path):
    """A sharded bf16 directory loads into bf16 params reading each tensor once (LazySafetensors),
    with the same values as an eager float32 load cast afterwards."""
    from safetensors.numpy import save_file

    cfg = llama.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    params = llama.LlamaForCausalLM(cfg).init_params(jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    tensors = {}
    for path, leaf in flat:
        p = "/".join(str(getattr(k, "key", k)) for k in path)
        arr = np.asarray(leaf).astype(jnp.bfloat16)
        tensors[llama.hf_param_name(p)] = arr.T.copy() if p.endswith("kernel") else arr
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, str(tmp_path / "a.safetensors"))
    save_file({k: tensors[k] for k in names[len(names) // 2:]}, str(tmp_path / "b.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("a" if i < len(names) // 2 else "b") + ".safetensors" for i, k in enumerate(names)}}))
    lazy = llama.LazySafetensors(llama._safetensors_files(tmp_path))
    loaded = llama.params_from_hf_tensors(lazy, cfg.replace(param_dtype=jnp.bfloat16))
    assert lazy.reads == len(names)                                   # each tensor read exactly once
    leaves = jax.tree_util.tree_leaves(loaded)
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    eager = llama.params_from_hf_tensors({k: np.asarray(v, np.float32) for k, v in tensors.items()}, cfg)
    for a, b in zip(leaves, jax.tree_util.tree_leaves(eager)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("attention", ["explicit", "xla"])
def test_packed_rows_compute_each_example_as_if_alone(attention):
    """Examples packed into rows with segment ids (what `jlora train --packing` builds) give each
    example the logits it has alone in its own row (its positions restart, nothing attends across),
    and the packed loss equals the loss over those logits, chunked or not."""
    from jlora.data.chat import _pack
    from jlora.train.losses import masked_lm_loss

    config = tiny(attention=attention)
    params = tiny_params(config, seed=5)
    model = llama.LlamaForCausalLM(config)
    rng = np.random.default_rng(1)
    examples = [rng.integers(0, 101, n).tolist() for n in (5, 7, 4, 6, 2)]   # 24 tokens: 3 rows of 8
    labels = [[-100, -100] + e[2:] for e in examples]                           # 2-token prompts
    packed = _pack(list(zip(examples, labels)), 8)
    assert packed["segment_ids"].tolist() == [[1] * 5 + [2] * 3, [1] * 4 + [2] * 4, [1] * 6 + [2] * 2]
    logits = model.apply(params, packed["input_ids"], segment_ids=packed["segment_ids"])

    def alone(tokens):
        return model.apply(params, jnp.asarray([tokens]))[0]

    # example 1 is cut by the row boundary: its tail starts row 1 as a segment of its own
    for row, cols, tokens in [(0, slice(0, 5), examples[0]), (0, slice(5, 8), examples[1][:3]),
                              (1, slice(0, 4), examples[1][3:]), (1, slice(4, 8), examples[2]),
                              (2, slice(0, 6), examples[3]), (2, slice(6, 8), examples[4])]:
        np.testing.assert_allclose(logits[row, cols], alone(tokens), atol=2e-5)
    ref = masked_lm_loss(logits, packed["labels"])
    for chunk in (None, 3):
        loss, n = model.apply(params, packed["input_ids"], packed["labels"], method="loss",
                              segment_ids=packed["segment_ids"], chunk=chunk)
        np.testing.assert_allclose(float(loss), float(ref[0]), rtol=1e-6)
        assert int(n) == int(ref[1])
    with pytest.raises(ValueError, match="segment_ids must have the shape of input_ids"):
        model.apply(params, packed["input_ids"], segment_ids=packed["segment_ids"][:, :4])
    with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a KV cache, prompt_embeddings"):
        model.apply(params, packed["input_ids"], segment_ids=packed["segment_ids"],
                    prompt_embeddings=jnp.zeros((3, 2, 32)))


@pytest.mark.parametrize("method", ["LoRA", "DoRA", "QLoRA"])
def test_bf16_compute_with_float32_master_factors(method):
    """With bfloat16 compute, the factors stay float32 in the trainable tree (the optimizer's master
    copy) and their gradients come back float32, while every matmul over the tokens, adapter paths
    included, runs in bfloat16 (lift casts the factors to the compute dtype inside each adapted
    matmul). The only float32 matmuls are DoRA's weight norms, on factor-sized matrices."""
    from jax.extend import core as jcore

    config = llama.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, scan_layers=True, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = llama.LlamaForCausalLM(config)
    ids = np.ones((2, 16), np.int32)
    spec = getattr(jlora, method)(rank=4, targets=llama.DEFAULT_TARGETS["all-linear"])
    adapted = jlora.apply(model.init_params(), spec, key=jax.random.key(0), model=model.apply, example=(ids[:1],))
    trainable, frozen = jlora.partition(adapted)
    lifted = jlora.lift(model.apply, strict=True)
    grad = jax.grad(lambda t: lifted(jlora.combine(t, frozen), ids, ids, method="loss", chunk=8)[0])
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(grad(trainable))} == {jnp.dtype("float32")}
    dots = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                dots.append([v.aval for v in eqn.invars])
            for value in eqn.params.values():
                for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                    if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                        walk(getattr(sub, "jaxpr", sub))

    walk(jax.make_jaxpr(grad)(trainable).jaxpr)
    wide = [d for d in dots if any(a.dtype != jnp.bfloat16 for a in d)]
    assert len(dots) > 60
    assert all(a.ndim == 2 and min(a.shape) <= 4 for d in wide for a in d), wide
    assert bool(wide) == (method == "DoRA")


def _count_dots(jaxpr):
    from jax.extend import core as jcore

    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general"
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, (jcore.ClosedJaxpr, jcore.Jaxpr)):
                    n += _count_dots(getattr(sub, "jaxpr", sub))
    return n


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_fused_projections_equal_separate_ones_and_join_the_factors(scan):
    """fuse_projections=True: q/k/v and gate/up each as one matmul, with the same parameter tree; the
    same logits, and through jlora.lift(strict=True) the same loss and gradients for LoRA, DoRA, QLoRA,
    LoRA on some of the joined kernels only, and LoRA with dropout; plain LoRA's A factors are joined
    (6 fewer matmuls per layer in the forward pass)."""
    config = tiny(scan_layers=scan, attention_bias=True)
    params = tiny_params(config, seed=7)
    separate, fused = llama.LlamaForCausalLM(config), llama.LlamaForCausalLM(config.replace(fuse_projections=True))
    assert jax.tree.structure(jax.eval_shape(fused.init_params)) == jax.tree.structure(params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (2, 9)))
    np.testing.assert_allclose(fused.apply(params, ids), separate.apply(params, ids), atol=2e-5)
    every = llama.DEFAULT_TARGETS["all-linear"]
    for spec in (jlora.LoRA(rank=2, targets=every), jlora.DoRA(rank=2, targets=every),
                 jlora.QLoRA(rank=2, targets=every), jlora.LoRA(rank=2, targets=r".*(q_proj|up_proj).*kernel"),
                 jlora.LoRA(rank=2, targets=every, dropout=0.2)):
        adapted = _randomize_factors(jlora.apply(params, spec, key=jax.random.key(0), model=fused.apply,
                                                 example=(ids[:1],)))
        trainable, frozen = jlora.partition(adapted)
        key = jax.random.key(5) if spec.dropout else None

        def loss(model):
            lifted = jlora.lift(model.apply, strict=True)
            return lambda t: lifted(jlora.combine(t, frozen), ids, ids, method="loss", jlora_rng=key)[0]

        (a, ga), (b, gb) = jax.value_and_grad(loss(separate))(trainable), jax.value_and_grad(loss(fused))(trainable)
        np.testing.assert_allclose(float(b), float(a), rtol=1e-5, err_msg=str(spec))
        for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6, err_msg=str(spec))
        if type(spec) is jlora.LoRA and spec.targets == jlora.LoRA(rank=2, targets=every).targets and not spec.dropout:
            count = [_count_dots(jax.make_jaxpr(lambda t: jlora.lift(m.apply)(jlora.combine(t, frozen), ids))(trainable)
                                 .jaxpr) for m in (separate, fused)]
            assert count[0] - count[1] == 6 * (1 if scan else config.num_hidden_layers), count
