"""PEFT prompt-learning adapter files: jlora prompts written by save_peft and read by PEFT's
PeftModel.from_pretrained (and back with load_peft), and PEFT-saved files read by jlora, compared
on the logits of tiny random BERT (sequence classification, with a trained head) and Llama (GQA)."""

import json

import jax
import numpy as np
import pytest

import jlora
from jlora.methods import prompt_peft as peft_prompt
from jlora.methods import prompt as jp
from jlora.models import bert, llama

from .test_prompt_peft import BERT_IDS, BERT_MASK, IDS, MASK, _bert_pair, _llama_pair

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

P = 3
HEAD = r".*/classifier/(kernel|bias)"
BERT_NAMING = lambda path, layer=None: bert.hf_module_name(path, layer, prefix="bert.")   # noqa: E731
LLAMA_NAMING = lambda path, layer=None: llama.hf_module_name(path, layer, prefix="")      # noqa: E731


def _moved(adapted, seed=1):
    """Every trainable leaf (prompt, encoder, head) moved off its init, so nothing matches by luck."""
    trainable, frozen = jlora.partition(adapted)
    leaves, treedef = jax.tree_util.tree_flatten(trainable)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jlora.combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)


def _bert_logits(model, adapted):
    return np.asarray(jlora.lift(model.apply)(adapted, BERT_IDS, BERT_MASK, **jlora.prompt_kwargs(adapted, 2)))


def _torch_logits(pm, **kw):
    pm.eval()
    with torch.no_grad():
        return pm(**{k: torch.tensor(v) for k, v in kw.items()}).logits.numpy()


SPECS = {
    "prompt": lambda: jlora.PromptTuning(P),
    "prefix_projection": lambda: jlora.PrefixTuning(P, projection_hidden=8),
    "ptuning_lstm": lambda: jlora.PTuning(P, encoder="lstm", hidden=8),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_bert_prompt_exports_load_in_peft_and_back(tmp_path, kind):
    hf, model, params = _bert_pair(tmp_path)
    adapted = jlora.apply_prompt(jlora.mark_trainable(params, HEAD), SPECS[kind](), jax.random.key(0),
                                 config=model.config)
    adapted = _moved(adapted)
    ours = _bert_logits(model, adapted)
    assert np.abs(ours - _bert_logits(model, params)).max() > 1e-2        # prompt and head matter
    out = tmp_path / "peft"
    jlora.io.save_peft(out, adapted, BERT_NAMING, task_type="SEQ_CLS")
    config = json.loads((out / "adapter_config.json").read_text())
    want = "PREFIX_TUNING" if kind.startswith("prefix") else "PROMPT_TUNING"   # P-tuning: its final prompt
    assert config["peft_type"] == want and config["num_virtual_tokens"] == P and config["modules_to_save"] == ["classifier"]
    if want == "PREFIX_TUNING":
        assert (config["num_layers"], config["num_attention_heads"], config["token_dim"]) == (2, 4, 32)
        assert config["prefix_projection"] is False                      # the projection is applied at export

    pm = peft.PeftModel.from_pretrained(hf, str(out))
    ref = _torch_logits(pm, input_ids=BERT_IDS, attention_mask=BERT_MASK)
    err = np.abs(ours - ref).max()
    print(f"\n{kind}: jlora -> PEFT max |logit diff| {err:.2e}")
    assert err < 1e-5

    back = jlora.io.load_peft(out, params, BERT_NAMING)
    assert set(jp.prompt_params(back)) == {"prefix_tuning" if want == "PREFIX_TUNING" else "prompt_tuning"}
    np.testing.assert_allclose(_bert_logits(model, back), ours, atol=1e-5)
    assert jlora.count(back)["trainable"] == jlora.count(jlora.export_prompt(adapted))["trainable"]
    with pytest.raises(FileExistsError):
        jlora.io.save_peft(out, adapted, BERT_NAMING, task_type="SEQ_CLS")   # never replaced silently


@pytest.mark.parametrize("reparam", ["MLP", "LSTM"])
def test_peft_saved_ptuning_file_loads_into_jlora(tmp_path, reparam):
    hf, model, params = _bert_pair(tmp_path)
    pm = peft.get_peft_model(hf, peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=P,
                                                          encoder_hidden_size=8, encoder_reparameterization_type=reparam))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    ref = _torch_logits(pm, input_ids=BERT_IDS, attention_mask=BERT_MASK)  # through PEFT's encoder
    pm.save_pretrained(str(tmp_path / "pt"))
    adapted = jlora.io.load_peft(tmp_path / "pt", params, BERT_NAMING)
    err = np.abs(_bert_logits(model, adapted) - ref).max()
    print(f"\nPEFT P-tuning ({reparam}) -> jlora max |logit diff| {err:.2e}")
    assert err < 1e-5
    assert isinstance(adapted["params"]["classifier"]["kernel"], jlora.Trainable)


def test_llama_gqa_prefix_round_trip_through_peft(tmp_path):
    hf, model, params = _llama_pair()
    adapted = _moved(jlora.apply_prompt(params, jlora.PrefixTuning(P), jax.random.key(0), config=model.config))
    jlora.io.save_peft(tmp_path / "p", adapted, LLAMA_NAMING, task_type="CAUSAL_LM")
    config = jlora.io.read_peft_config(tmp_path / "p")
    c = model.config
    assert (config["num_attention_heads"], config["token_dim"]) == (c.num_key_value_heads, c.num_key_value_heads * c.head_dim)
    assert config["modules_to_save"] is None
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "p"))
    positions = np.maximum(np.cumsum(MASK, 1) - 1, 0)
    ref = _torch_logits(pm, input_ids=IDS, attention_mask=MASK, position_ids=positions)
    ours = np.asarray(jlora.lift(model.apply)(adapted, IDS, MASK, **jlora.prompt_kwargs(adapted, 2)))
    real = MASK.astype(bool)
    err = np.abs(ours[real] - ref[real]).max()
    assert err < 1e-5 * max(1.0, np.abs(ref).max()), err
    back = jlora.io.load_peft(tmp_path / "p", params, LLAMA_NAMING)
    np.testing.assert_array_equal(np.asarray(back[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].value),
                                  np.asarray(adapted[jp.PROMPT_KEY]["prefix_tuning"]["embedding"].value))


def test_prompt_file_errors(tmp_path):
    _, model, params = _bert_pair(tmp_path)
    prompt = jlora.apply_prompt(params, jlora.PromptTuning(P), jax.random.key(0), config=model.config)
    both = jlora.apply(prompt, jlora.LoRA(rank=2, targets=r".*/query/kernel"), jax.random.key(1))
    with pytest.raises(ValueError, match="holds one method"):
        jlora.io.save_peft(tmp_path / "both", both, BERT_NAMING, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="needs task_type=.*got None"):
        jlora.io.save_peft(tmp_path / "none", prompt, BERT_NAMING)
    assert not (tmp_path / "none").exists()
    jlora.io.save_peft(tmp_path / "ok", prompt, BERT_NAMING, task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="already carry a prompt"):
        jlora.io.load_peft(tmp_path / "ok", prompt, BERT_NAMING)
    # a prefix file whose tensor does not fit its own config
    jlora.io.save_peft(tmp_path / "pre", jlora.apply_prompt(params, jlora.PrefixTuning(P), jax.random.key(0),
                                                            config=model.config), BERT_NAMING, task_type="SEQ_CLS")
    cfg_file = tmp_path / "pre" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(jlora.io.PeftFormatError, match=r"edited after jlora wrote it: num_layers 2 -> 3"):
        jlora.io.load_peft(tmp_path / "pre", params, BERT_NAMING)
    from jlora.io import peft as jpeft   # as a PEFT-made file (no jlora record): the shape check speaks
    weights = str(tmp_path / "pre" / "adapter_model.safetensors")
    jpeft._write_safetensors(weights, jpeft._read_safetensors(weights), {"format": "pt"})
    with pytest.raises(jlora.io.PeftFormatError, match=r"does not fit num_layers=3"):
        jlora.io.load_peft(tmp_path / "pre", params, BERT_NAMING)
    cfg_file.write_text(json.dumps({**cfg, "num_transformer_submodules": 2}))
    with pytest.raises(jlora.io.PeftFormatError, match="encoder-decoder"):
        jlora.io.load_peft(tmp_path / "pre", params, BERT_NAMING)
    assert set(peft_prompt.PROMPT_TYPES) <= set(jlora.methods._peft.tree_peft_types())
