"""The chunked causal-LM loss: the same value and gradients as the loss over the full logits, through
the model's own ``loss`` method and ``jlora.lift`` (adapters on the head included), with a fraction of
the memory."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.methods.prompt import IGNORE_INDEX
from jlora.models import llama
from jlora.train.losses import check_loss_chunk, chunked_lm_loss, masked_lm_loss


def _labels(rng, shape, vocab):
    labels = rng.integers(0, vocab, shape).astype(np.int32)
    labels[:, :3] = IGNORE_INDEX            # a prompt
    labels[-1, shape[1] // 2:] = IGNORE_INDEX   # padding
    return labels


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
@pytest.mark.parametrize("prompt", [0, 3])
def test_chunked_equals_the_full_logits(chunk, prompt):
    """Value, token count and gradients (w.r.t. the hidden states and the head) equal
    masked_lm_loss over the whole logits, for chunks that do and do not divide the sequence, one
    position, longer than the sequence, and P virtual tokens in front of the labels."""
    rng = np.random.default_rng(0)
    B, T, d, V = 3, 13, 8, 50
    h = jnp.asarray(rng.standard_normal((B, T + prompt, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, V)), jnp.float32)
    labels = jnp.asarray(_labels(rng, (B, T), V))

    def full(h, w):
        return masked_lm_loss(h @ w, labels)

    def chunked(h, w):
        return chunked_lm_loss(h, lambda x: x @ w, labels, chunk)

    (a, na), ga = jax.value_and_grad(full, (0, 1), has_aux=True)(h, w)
    (b, nb), gb = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(h, w)
    assert int(na) == int(nb) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    np.testing.assert_allclose(float(b), float(a), rtol=1e-6)
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-7)


def test_no_target_gives_zero_not_nan():
    h = jnp.ones((2, 6, 4))
    loss, n = chunked_lm_loss(h, lambda x: x @ jnp.ones((4, 9)), jnp.full((2, 6), IGNORE_INDEX), 4)
    assert int(n) == 0 and float(loss) == 0.0


@pytest.mark.parametrize("bad", [-1, 2.5, True, "64"])
def test_bad_chunks_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"loss_chunk must be a positive number of sequence positions.*got {bad!r}"):
        check_loss_chunk(bad)
    assert check_loss_chunk(0) is None and check_loss_chunk(None) is None and check_loss_chunk(8) == 8


@pytest.mark.parametrize("tie", [False, True], ids=["lm_head", "tied"])
def test_llama_loss_method_through_lift_matches_the_logits(tie):
    """``model.apply(..., method="loss", chunk=N)`` through ``jlora.lift(strict=True)`` equals
    masked_lm_loss over the model's logits, gradients for LoRA on q_proj and on the vocabulary head
    (untied) included: the head's adapter stays factored inside the chunk loop."""
    cfg = llama.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie, scan_layers=True)
    model = llama.LlamaForCausalLM(cfg)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 300, (3, 21)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[-1, 10:] = 0
    labels = _labels(rng, ids.shape, 300)
    adapted = jlora.apply(model.init_params(), jlora.LoRA(rank=4, targets=r".*(q_proj|lm_head).*kernel"),
                          key=jax.random.key(1), model=model.apply, example=(ids[:1],))
    trainable, frozen = jlora.partition(adapted)
    trainable = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), trainable)
    assert tie or "lm_head" in str(jax.tree_util.tree_structure(trainable))
    forward = jlora.lift(model.apply, strict=True)

    def reference(t):
        return masked_lm_loss(forward(jlora.combine(t, frozen), ids, mask), labels)[0]

    value, grads = jax.value_and_grad(reference)(trainable)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for chunk in (None, 5, 8):
            fn = lambda t: forward(jlora.combine(t, frozen), ids, labels, mask, method="loss", chunk=chunk)[0]
            v, g = jax.jit(jax.value_and_grad(fn))(trainable)
            np.testing.assert_allclose(float(v), float(value), rtol=1e-6)
            for x, y in zip(jax.tree.leaves(grads), jax.tree.leaves(g)):
                np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_llama_loss_method_with_a_prompt_in_front():
    """Prompt tuning: the hidden states cover P + T positions and the labels get P ignored
    entries in front, as over the logits."""
    cfg = llama.LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2)
    model = llama.LlamaForCausalLM(cfg)
    params = model.init_params()
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 100, (2, 9)).astype(np.int32)
    labels = _labels(rng, ids.shape, 100)
    prompt = jnp.asarray(rng.standard_normal((2, 4, 16)), jnp.float32)
    ref = masked_lm_loss(model.apply(params, ids, prompt_embeddings=prompt), labels)
    got = model.apply(params, ids, labels, method="loss", chunk=3, prompt_embeddings=prompt)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
    assert int(got[1]) == int(ref[1])


def test_chunking_drops_the_float32_logits_from_the_compiled_step():
    """At a 32k vocabulary the full float32 logits of 4 x 512 positions are 250 MiB; XLA's memory
    analysis of the gradient shows the chunked loss needs less than the full logits' size in all,
    and at least 2.5x less scratch than the unchunked one."""
    cfg = llama.LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, remat=True, scan_layers=True)
    model = llama.LlamaForCausalLM(cfg)
    params = jax.eval_shape(model.init_params)
    adapted = jax.eval_shape(lambda p: jlora.apply(p, jlora.LoRA(rank=8, targets=r".*(q_proj|v_proj).*kernel"),
                                                   key=jax.random.key(1), model=model.apply,
                                                   example=(jnp.zeros((1, 8), jnp.int32),)), params)
    trainable, frozen = jlora.partition(adapted)
    forward = jlora.lift(model.apply)
    ids = jax.ShapeDtypeStruct((4, 512), jnp.int32)
    logits_bytes = 4 * 512 * 32000 * 4

    def temp(chunk):
        fn = lambda t, f, x: forward(jlora.combine(t, f), x, x, method="loss", chunk=chunk)[0]
        return jax.jit(jax.grad(fn)).lower(trainable, frozen, ids).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp(None), temp(64)
    assert full > logits_bytes          # the unchunked loss holds at least one float32 copy
    assert chunked < logits_bytes
    assert full / chunked > 2.5, (full, chunked)
