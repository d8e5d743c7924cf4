"""Remat policies by name (LlamaConfig / BertConfig / ViTConfig ``remat``): the same numbers as
no remat, and what each keeps for the backward pass, as JAX's autodiff reports it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.core import _compat
from jlora.models import bert, llama, vit
from jlora.models._hf import REMAT_POLICIES

CONFIG = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, scan_layers=True, initializer_range=0.2)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 101, (2, 16)))


def _setup(remat):
    model = llama.LlamaForCausalLM(llama.LlamaConfig(**CONFIG, remat=remat))
    params = llama.LlamaForCausalLM(llama.LlamaConfig(**CONFIG)).init_params(jax.random.key(0))
    adapted = jlora.apply(params, jlora.LoRA(rank=4, targets=llama.DEFAULT_TARGETS["all-linear"], init="gaussian"),
                          key=jax.random.key(1), model=model.apply, example=(IDS[:1],))
    trainable, frozen = jlora.partition(adapted)
    forward = jlora.lift(model.apply)

    def loss(t):
        return jnp.mean(jax.nn.log_softmax(forward(jlora.combine(t, frozen), IDS)) ** 2)

    return trainable, loss


def _saved_bytes(remat) -> int:
    trainable, loss = _setup(remat)
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a, why in _compat.saved_residuals(loss, trainable)
               if "from the argument" not in why and "from a constant" not in why)


@pytest.mark.parametrize("remat", (True,) + REMAT_POLICIES)
def test_every_policy_gives_the_same_loss_and_gradients(remat):
    trainable, loss = _setup(False)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(trainable)
    trainable, loss = _setup(remat)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(trainable)
    np.testing.assert_allclose(got_loss, ref_loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_policies_keep_what_they_name():
    """No remat keeps every intermediate; dots_saveable the matmul outputs (attention scores
    included); dots_with_no_batch_dims_saveable only the weight matmuls'; nothing_saveable (True)
    only each layer's input."""
    none, dots = _saved_bytes(False), _saved_bytes("dots_saveable")
    weights, nothing = _saved_bytes("dots_with_no_batch_dims_saveable"), _saved_bytes(True)
    assert none > dots > weights > nothing, (none, dots, weights, nothing)
    assert _saved_bytes("nothing_saveable") == nothing


def test_remat_settings_are_checked_in_every_model():
    assert llama.LlamaConfig(**CONFIG, remat="dots_saveable").remat == "dots_saveable"
    assert bert.BertConfig(remat="dots_with_no_batch_dims_saveable").remat == "dots_with_no_batch_dims_saveable"
    assert vit.ViTConfig(remat=np.bool_(True)).remat is True
    for cls, kw in ((llama.LlamaConfig, CONFIG), (bert.BertConfig, {}), (vit.ViTConfig, {})):
        with pytest.raises(ValueError, match=f"{cls.__name__}.remat must be True, False or a policy in .*, got 'all'"):
            cls(**kw, remat="all")
