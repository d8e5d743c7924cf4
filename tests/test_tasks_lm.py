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


def test_attention_mask_left_out_only_where_the_loss_cannot_tell(tiny_loaded, monkeypatch):
    """mask_is_redundant: right-padded rows with no label on a padded position. There the loss
    without the attention mask equals the loss with it (value and gradients, explicit and xla
    attention), and the fused attention gets no dense mask; left padding or a labelled padded
    position keeps the mask."""
    from jlora.cli.tasks_lm import mask_is_redundant

    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0]], np.int32)
    right = np.array([[1] * 6, [1, 1, 1, 0, 0, 0]], np.int32)
    labels = np.where(right == 1, ids, IGNORE_INDEX)
    assert mask_is_redundant({"attention_mask": right, "labels": labels})
    assert mask_is_redundant({"attention_mask": np.ones_like(ids), "input_ids": ids})
    assert not mask_is_redundant({"attention_mask": right[:, ::-1], "labels": labels[:, ::-1]})   # left padding
    assert not mask_is_redundant({"attention_mask": right, "labels": ids})                         # labelled padding
    assert not mask_is_redundant({"attention_mask": np.array([[1, 0, 1, 1, 1, 1]] * 2), "labels": labels})

    model, params, _ = tiny_loaded
    task = InstructionTask.__new__(InstructionTask)
    task.loss_chunk = None
    adapted = jlora.apply(params, jlora.LoRA(rank=2, targets=llama.DEFAULT_TARGETS["all-linear"]), key=jax.random.key(1))
    trainable, frozen = jlora.partition(adapted)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(right), "labels": jnp.asarray(labels)}
    for attention in ("explicit", "xla"):
        lifted = jlora.lift(llama.LlamaForCausalLM(model.config.replace(attention=attention)).apply)
        values = [jax.value_and_grad(lambda t: task.lm_loss(lifted, jlora.combine(t, frozen), batch, mask=m)[0])(trainable)
                  for m in (True, False)]
        np.testing.assert_allclose(values[0][0], values[1][0], rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(values[0][1]), jax.tree_util.tree_leaves(values[1][1])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    seen = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: seen.append(kw.get("mask")) or real(*a, **kw))
    task.lm_loss(lifted, params, batch, mask=False)
    assert seen and all(m is None for m in seen)


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
