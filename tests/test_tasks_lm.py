"""InstructionTask: ChatML instruction pairs with the loss on response tokens, trained through the
CLI's train() on a tiny random Llama that uses SmolLM2's real tokenizer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora import assets, cli
from jlora.data.instruct import IGNORE_INDEX
from jlora.models import llama
from jlora.tasks_lm import InstructionTask, masked_lm_loss


def test_masked_lm_loss_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    labels = np.array([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 6, 0]], np.int32)
    loss, n = masked_lm_loss(jnp.asarray(logits), jnp.asarray(labels))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    terms = [-logp[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 5) if labels[b, t] != IGNORE_INDEX]
    assert int(n) == len(terms) == 6
    np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_loaded():
    import gguf

    tok = llama.tokenizer_from_gguf(gguf.GGUFReader(str(assets.ensure("smollm2") / llama.SMOLLM2_GGUF)))
    cfg = llama.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = llama.LlamaForCausalLM(cfg)
    return model, model.init_params(jax.random.key(0)), tok


def test_instruction_task_trains_evaluates_and_generates(tmp_path, tiny_loaded):
    task = InstructionTask(data="chatterbot", max_length=32, loaded=tiny_loaded)
    train = task.arrays["train"]
    assert train["input_ids"].shape[1] == 32 and (train["labels"] != IGNORE_INDEX).any(axis=1).mean() > 0.5
    lifted = jlora.lift(task.model.apply)
    before = task.evaluate(lifted, task.params, "validation", limit=8)
    cfg = cli.load_config(dict(model="smollm2", data="chatterbot", steps=12, batch=4, lr=3e-2, max_length=32,
                               eval_limit=8, progress=False, out=str(tmp_path / "run")))
    result = cli.train(cfg, task=task)
    assert result["final_train_loss"] < json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    after = task.evaluate(lifted, result["_adapted"], "validation", limit=8)
    assert before["response_tokens"] == after["response_tokens"] > 0
    assert np.isfinite(after["loss"]) and after["loss"] != before["loss"]
    text = task.generate(lifted, result["_adapted"], "What is a computer?", max_new_tokens=4)
    assert isinstance(text, str)
    with pytest.raises(SystemExit, match="no new head"):
        cli.build(cli.load_config(dict(model="smollm2", data="chatterbot", method="head")), task=task)
