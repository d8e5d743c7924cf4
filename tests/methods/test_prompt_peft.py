"""Prefix tuning and prompt tuning against Hugging Face PEFT on tiny random models.

PEFT's parameters are copied into jlora's leaves byte for byte (the prefix is PEFT's
``Embedding(P, 2*L*kv_dim)`` weight reshaped to ``(P, L, 2, kv_heads, head_dim)``) and the logits
and the loss must agree, with a left-padded row in the batch.

Positions with left padding: PEFT leaves positions to the base model. For prefix tuning it adds
``P`` to explicit ``position_ids`` (which we pass as ``cumsum(mask) - 1``, what jlora computes from
the mask); for prompt tuning it drops them, so the Llama runs at ``0 .. P+T-1`` whatever the
padding, and we pass jlora the same positions explicitly there.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.methods import prompt as jp
from jlora.models import bert, llama
from jlora.cli.tasks_lm import masked_lm_loss

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

P = 3
LLAMA = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64)
IDS = np.array([[5, 17, 42, 8, 99, 3, 60], [0, 0, 12, 13, 14, 15, 16]], np.int64)     # row 1 left-padded
MASK = np.array([[1] * 7, [0, 0, 1, 1, 1, 1, 1]], np.int64)
LABELS = np.where(MASK == 1, IDS, -100)
LABELS[:, :3] = -100            # a prompt part (and row 1's first real token: a pad position predicts it)


def _llama_pair(seed=0):
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    hf.eval()
    config = llama.LlamaConfig.from_hf(hf.config.to_dict())
    params = llama.params_from_hf_tensors({k: v.detach().numpy() for k, v in hf.state_dict().items()}, config)
    return hf, llama.LlamaForCausalLM(config), params


def _peft_prompt_weight(pm):
    """The one trainable tensor of a PEFT prompt-learning model (its prompt encoder's embedding)."""
    (name, w), = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert name.endswith("embedding.weight"), name
    return w.detach().numpy()


def _with_prompt(adapted, kind, embedding):
    return jp._with_entry(adapted, jp._wrap({kind: {"embedding": jnp.asarray(embedding)}}, jp.PROMPT_KEY))


def _real(x, mask=MASK):
    return np.asarray(x)[mask.astype(bool)]


@pytest.mark.parametrize("scan", [False, True])
def test_llama_prefix_tuning_matches_peft(scan):
    hf, model, params = _llama_pair()
    if scan:
        model = llama.LlamaForCausalLM(model.config.replace(scan_layers=True))
        params = llama.stack_layers(params)
    pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    w = _peft_prompt_weight(pm)
    c = model.config
    assert w.shape == (P, 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim)   # GQA: kv_dim, not hidden
    adapted = jlora.apply_prompt(params, jlora.PrefixTuning(P), jax.random.key(0), config=c)
    leaf = adapted[jp.PROMPT_KEY]["prefix_tuning"]["embedding"]
    assert leaf.shape == (P, c.num_hidden_layers, 2, c.num_key_value_heads, c.head_dim)
    assert leaf.value.size == w.size and leaf.value.dtype == w.dtype
    adapted = _with_prompt(adapted, "prefix_tuning", w.reshape(leaf.shape))  # same bytes, row-major reshape
    # jlora's layer-l keys/values are PEFT's past_key_values[l] (B, kv_heads, P, head_dim)
    kw = jlora.prompt_kwargs(adapted, 2)
    cache = pm.get_prompt(2)
    for l in range(c.num_hidden_layers):
        k_ref, v_ref = (cache[l] if isinstance(cache, tuple) else (cache.layers[l].keys, cache.layers[l].values))
        np.testing.assert_array_equal(np.asarray(kw["prefix"]["k"][l]), k_ref.detach().numpy().transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(np.asarray(kw["prefix"]["v"][l]), v_ref.detach().numpy().transpose(0, 2, 1, 3))

    fwd = jax.jit(lambda p, ids, mask: model.apply(p, ids, mask, **jlora.prompt_kwargs(p, ids.shape[0])))
    ours = np.asarray(fwd(adapted, IDS, MASK))
    assert ours.shape == IDS.shape + (c.vocab_size,)                     # the prefix adds no output positions
    positions = np.maximum(np.cumsum(MASK, 1) - 1, 0)
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS),
                 position_ids=torch.tensor(positions))
    ref = out.logits.numpy()
    err = np.abs(_real(ours) - _real(ref)).max()
    print(f"\nprefix tuning vs PEFT (llama GQA, scan={scan}): max |logit diff| {err:.2e}, "
          f"max |logit| {np.abs(ref).max():.1f}")
    assert err < 1e-5 * max(1.0, np.abs(ref).max())
    loss, _ = masked_lm_loss(jnp.asarray(ours), jnp.asarray(LABELS))
    assert abs(float(loss) - float(out.loss)) < 1e-5, (float(loss), float(out.loss))
    # no padding, no position_ids: both run the tokens at positions P .. P+T-1
    with torch.no_grad():
        ref0 = pm(input_ids=torch.tensor(IDS[:1])).logits.numpy()
    ours0 = np.asarray(model.apply(adapted, IDS[:1], **jlora.prompt_kwargs(adapted, 1)))
    np.testing.assert_allclose(ours0, ref0, atol=1e-5 * max(1.0, np.abs(ref0).max()))
    # and the gradient of the loss w.r.t. the prefix is PEFT's gradient, reshaped
    pm.zero_grad()
    pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS),
       position_ids=torch.tensor(positions)).loss.backward()
    (g_ref,) = [p.grad.numpy() for p in pm.parameters() if p.requires_grad]
    trainable, frozen = jlora.partition(adapted)
    grad = jax.grad(lambda t: masked_lm_loss(fwd(jlora.combine(t, frozen), IDS, MASK), jnp.asarray(LABELS))[0])(trainable)
    g = np.asarray(unwrap_leaf(grad[jp.PROMPT_KEY]["prefix_tuning"]["embedding"]))
    np.testing.assert_allclose(g.reshape(g_ref.shape), g_ref, atol=1e-6 * max(1.0, np.abs(g_ref).max()), rtol=1e-4)


def unwrap_leaf(x):
    return x.value if isinstance(x, jlora.Trainable) else x


def test_llama_prompt_tuning_matches_peft():
    hf, model, params = _llama_pair()
    pm = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    w = _peft_prompt_weight(pm)
    adapted = jlora.apply_prompt(params, jlora.PromptTuning(P), jax.random.key(0), config=model.config)
    leaf = adapted[jp.PROMPT_KEY]["prompt_tuning"]["embedding"]
    assert leaf.shape == w.shape
    adapted = _with_prompt(adapted, "prompt_tuning", w)
    full_mask = np.concatenate([np.ones((2, P), np.int64), MASK], 1)
    positions = np.broadcast_to(np.arange(P + IDS.shape[1]), full_mask.shape)  # PEFT drops position_ids
    ours = np.asarray(model.apply(adapted, IDS, MASK, positions=positions, **jlora.prompt_kwargs(adapted, 2)))
    assert ours.shape == (2, P + IDS.shape[1], model.config.vocab_size)
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(LABELS))
    ref = out.logits.numpy()
    err = np.abs(_real(ours, full_mask) - _real(ref, full_mask)).max()
    print(f"\nprompt tuning vs PEFT (llama): max |logit diff| {err:.2e}")
    assert err < 1e-5 * max(1.0, np.abs(ref).max())
    loss, _ = masked_lm_loss(jnp.asarray(ours), jnp.asarray(LABELS))           # pads P ignored labels in front
    assert abs(float(loss) - float(out.loss)) < 1e-5, (float(loss), float(out.loss))
    # without padding jlora's default positions are PEFT's
    ours0 = np.asarray(model.apply(adapted, IDS[:1], MASK[:1], **jlora.prompt_kwargs(adapted, 1)))
    with torch.no_grad():
        ref0 = pm(input_ids=torch.tensor(IDS[:1]), attention_mask=torch.tensor(MASK[:1])).logits.numpy()
    np.testing.assert_allclose(ours0, ref0, atol=1e-5 * max(1.0, np.abs(ref0).max()))


# ---------------------------------------------------------------------------------------------
# BERT (sequence classification): PEFT's prompt tensors and the classifier head

BERT_IDS = np.array([[2, 17, 45, 98, 3, 61, 7], [2, 11, 9, 3, 0, 0, 0]], np.int64)           # row 1 right-padded
BERT_MASK = (np.arange(7)[None, :] < np.array([[7], [4]])).astype(np.int64)
BERT_LABELS = np.array([2, 0])


def _bert_pair(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, vocab_size=99,
        num_labels=3, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.1 * torch.randn_like(p))        # non-zero biases, LayerNorm scales != 1
    hf.eval()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = bert.BertConfig.from_hf(hf.config.to_dict())
    return hf, bert.BertForSequenceClassification(cfg), bert.load_hf_params(tmp_path, cfg, strict=True)


def _peft_bert_prompt_weight(pm):
    (w,) = [p for n, p in pm.named_parameters() if p.requires_grad and "prompt_encoder" in n]
    return w.detach().numpy()


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_bert_prefix_and_prompt_tuning_match_peft(tmp_path, kind):
    hf, model, params = _bert_pair(tmp_path)
    c = model.config
    if kind == "prefix":
        pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
        spec, leaf_kind = jlora.PrefixTuning(P), "prefix_tuning"
    else:
        pm = peft.get_peft_model(hf, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=P))
        spec, leaf_kind = jlora.PromptTuning(P), "prompt_tuning"
    pm.eval()
    w = _peft_bert_prompt_weight(pm)
    adapted = jlora.apply_prompt(params, spec, jax.random.key(0), config=c)
    leaf = adapted[jp.PROMPT_KEY][leaf_kind]["embedding"]
    assert leaf.value.size == w.size
    if kind == "prefix":
        assert leaf.shape == (P, c.num_hidden_layers, 2, c.num_attention_heads, c.hidden_size // c.num_attention_heads)
    adapted = _with_prompt(adapted, leaf_kind, w.reshape(leaf.shape))
    ours = np.asarray(model.apply(adapted, BERT_IDS, BERT_MASK, **jlora.prompt_kwargs(adapted, 2)))
    with torch.no_grad():
        out = pm(input_ids=torch.tensor(BERT_IDS), attention_mask=torch.tensor(BERT_MASK),
                 labels=torch.tensor(BERT_LABELS))
    ref = out.logits.numpy()
    err = np.abs(ours - ref).max()
    print(f"\n{kind} tuning vs PEFT (BERT seq-cls): max |logit diff| {err:.2e}")
    assert err < 1e-5
    plain = np.asarray(model.apply(params, BERT_IDS, BERT_MASK))
    assert np.abs(plain - ref).max() > 1e-3                              # the prompt does change the logits
    loss = -np.take_along_axis(np.asarray(jax.nn.log_softmax(ours)), BERT_LABELS[:, None], 1).mean()
    assert abs(loss - float(out.loss)) < 1e-5
