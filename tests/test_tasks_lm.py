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
from jlora.cli.tasks_lm import InstructionTask, masked_lm_loss


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


@pytest.mark.parametrize("method,extra", [("prompt", {"prompt_init": "text", "prompt_init_text": "Answer briefly."}),
                                          ("prefix", {"prefix_projection": 8})])
def test_instruction_task_trains_prompt_methods(tmp_path, tiny_loaded, method, extra):
    """Prompt tuning pads the labels with P ignored entries (logits cover P + T positions);
    prefix tuning keeps T. Both train through the CLI, evaluate on the same response tokens,
    reload from the run directory and generate."""
    task = InstructionTask(data="chatterbot", max_length=32, loaded=tiny_loaded)
    lifted = jlora.lift(task.model.apply)
    before = task.evaluate(lifted, task.params, "validation", limit=8)
    cfg = cli.load_config(dict(model="smollm2", data="chatterbot", method=method, virtual_tokens=4, steps=8, batch=4,
                               lr=1e-1, max_length=32, eval_limit=8, progress=False, out=str(tmp_path / method), **extra))
    result = cli.train(cfg, task=task)
    adapted = result["_adapted"]
    batch = {k: v[:8] for k, v in task.arrays["train"].items()}
    logits = task.forward(lifted, adapted, batch)
    assert logits.shape[1] == 32 + (4 if method == "prompt" else 0)
    trained_paths = [t["path"] for t in json.loads((tmp_path / method / "adapter" / "jlora_adapter.json").read_text())["trainables"]]
    assert trained_paths == [f"jlora_prompt/{'prompt' if method == 'prompt' else 'prefix'}_tuning/embedding"]
    loss = jax.jit(task.loss_fn(lifted))
    _, start, _ = cli.build(cfg, task=task)                                 # the same (seeded) initial prompt
    assert float(loss(adapted, batch, None)[0]) < float(loss(start, batch, None)[0])   # same batch, trained prompt
    after = task.evaluate(lifted, adapted, "validation", limit=8)
    assert after["response_tokens"] == before["response_tokens"] > 0 and after["loss"] != before["loss"]
    reloaded = jlora.load_prompt_adapter(str(tmp_path / method / "adapter"), task.params)
    again = task.evaluate(lifted, reloaded, "validation", limit=8)
    assert again["loss"] == pytest.approx(after["loss"], rel=1e-5)
    assert isinstance(task.generate(lifted, adapted, "What is a computer?", max_new_tokens=3), str)
