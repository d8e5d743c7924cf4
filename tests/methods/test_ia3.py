"""IA3: output / feed-forward input scaling, factored in lift, merge/unmerge, PEFT parity."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.methods.ia3 import DEFAULTS

from ..core._helpers import assert_lift_matches_merge
from ..core.test_lift import IDS, LM, X48, Attention

KEY = jax.random.key(0)


def _scramble(adapted, seed=1):
    """Scales away from their init (ones), so the test can tell inputs from outputs."""
    rng = np.random.default_rng(seed)

    def f(leaf):
        if not jlora.is_node(leaf):
            return leaf
        return leaf.with_(extra={n: {"l": jnp.asarray(1 + 0.5 * rng.standard_normal(d["l"].shape), d["l"].dtype)}
                                 for n, d in leaf.extra.items()})
    return jax.tree_util.tree_map(f, adapted, is_leaf=jlora.is_node)


@pytest.mark.parametrize("feedforward", [False, True])
def test_dense_scaling_merge_unmerge(feedforward):
    dense = nn.Dense(6)
    x = jax.random.normal(KEY, (4, 9))
    params = dense.init(jax.random.key(1), x)
    spec = jlora.IA3(targets=".*kernel", feedforward=".*kernel" if feedforward else None)
    ad = jlora.apply(params, spec)
    node = ad["params"]["kernel"]
    assert node.extra["default"]["l"].shape == ((9,) if feedforward else (6,))
    assert node.a == {} and node.b == {} and node.meta["default"].feedforward is feedforward
    lifted = jlora.lift(dense.apply, strict=True)
    np.testing.assert_allclose(lifted(ad, x), dense.apply(params, x), atol=1e-6)  # ones: a no-op
    ad = _scramble(ad)
    l = np.asarray(ad["params"]["kernel"].extra["default"]["l"])
    w, bias = np.asarray(params["params"]["kernel"]), np.asarray(params["params"]["bias"])
    want = (np.asarray(x) * l) @ w + bias if feedforward else (np.asarray(x) @ w) * l + bias
    np.testing.assert_allclose(lifted(ad, x), want, rtol=1e-5, atol=1e-5)
    merged = jlora.merge(ad)
    np.testing.assert_allclose(merged["params"]["kernel"], w * (l[:, None] if feedforward else l[None, :]), rtol=1e-6)
    np.testing.assert_array_equal(merged["params"]["bias"], bias)
    back = jlora.unmerge(merged, ad)
    np.testing.assert_allclose(back["params"]["kernel"].base, w, rtol=1e-5, atol=1e-6)
    assert_lift_matches_merge(dense.apply, ad, x)
    assert jlora.count(ad)["trainable"] == (9 if feedforward else 6)


def test_multi_axis_and_scanned_models():
    att = Attention()
    params = att.init(KEY, X48)
    spec = jlora.IA3(targets=r".*/(key|value|out)/kernel", feedforward=r".*/out/kernel")
    ad = _scramble(jlora.apply(params, spec, model=att.apply, example=(X48,)))
    assert ad["params"]["out"]["kernel"].extra["default"]["l"].shape == (4, 12)  # the (heads, head_dim) inputs
    assert ad["params"]["key"]["kernel"].extra["default"]["l"].shape == (4, 12)  # the (heads, head_dim) outputs
    assert_lift_matches_merge(att.apply, ad, X48)

    model = LM(layers=2)
    params = model.init(KEY, IDS)
    spec = jlora.IA3(targets=r".*/(key|value|down)/kernel", feedforward=r".*/down/kernel")
    ad = _scramble(jlora.apply(params, spec, model=model.apply, example=(IDS,)))
    assert ad["params"]["blocks"]["down"]["kernel"].extra["default"]["l"].shape == (2, 96)  # stacked layers
    assert_lift_matches_merge(model.apply, ad, IDS)


def test_training_changes_only_scales_and_round_trips(tmp_path):
    dense = nn.Dense(6)
    x = jax.random.normal(KEY, (4, 9))
    params = dense.init(jax.random.key(1), x)
    spec = jlora.IA3(targets=".*kernel")
    ad = jlora.apply(params, spec)
    trainable, frozen = jlora.partition(ad)
    lifted = jlora.lift(dense.apply)
    g = jax.grad(lambda t: jnp.sum(lifted(jlora.combine(t, frozen), x) ** 2))(trainable)
    assert [np.shape(v) for v in jax.tree_util.tree_leaves(g)] == [(6,)]
    trainable = jax.tree_util.tree_map(lambda p, d: p - 0.1 * d, trainable, g)
    new = jlora.combine(trainable, frozen)
    assert not np.allclose(new["params"]["kernel"].extra["default"]["l"], 1.0)
    jlora.io.save_adapter(tmp_path / "ia3", new, spec)
    back = jlora.io.load_adapter(tmp_path / "ia3", params)
    np.testing.assert_allclose(lifted(back, x), lifted(new, x), atol=1e-6)
    assert "ia3" in jlora.summary(new)


def test_ia3_does_not_stack_with_lora_and_rejects_embeddings():
    dense = nn.Dense(6)
    params = dense.init(KEY, jnp.ones((1, 9)))
    ad = jlora.apply(params, jlora.LoRA(rank=2, targets=".*kernel"))
    with pytest.raises(ValueError, match="IA3 cannot be combined"):
        jlora.apply(ad, jlora.IA3(targets=".*kernel"), name="ia3")
    emb = {"params": {"embed": {"embedding": jnp.ones((10, 4))}}}
    with pytest.raises(ValueError, match="embedding"):
        jlora.apply(emb, jlora.IA3(targets=".*embedding"))
    with pytest.raises(TypeError, match="floating dtype"):
        jlora.IA3(targets=".*kernel", dtype=jnp.int32)


def test_default_patterns_pick_peft_modules():
    from jlora.core.paths import matches
    t, ff = DEFAULTS["llama"]
    assert matches("params/model/layers/self_attn/k_proj/kernel", [t])
    assert not matches("params/model/layers/self_attn/q_proj/kernel", [t])
    assert matches("params/model/layers/mlp/down_proj/kernel", [ff])
    t, ff = DEFAULTS["bert"]
    assert matches("params/encoder/layer_0/attention/self/value/kernel", [t])
    assert matches("params/encoder/layer_0/output/dense/kernel", [ff])
    assert not matches("params/encoder/layer_0/attention/self/query/kernel", [t])


@pytest.mark.parametrize("feedforward", [False, True])
def test_matches_peft_ia3_linear(feedforward):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    rng = np.random.default_rng(0)
    net = torch.nn.Sequential()
    net.add_module("proj", torch.nn.Linear(8, 5, bias=False))
    cfg = peft.IA3Config(target_modules=["proj"], feedforward_modules=["proj"] if feedforward else [])
    model = peft.get_peft_model(net, cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        l = layer.ia3_l["default"]
        l.copy_(torch.from_numpy((1 + 0.5 * rng.standard_normal(tuple(l.shape))).astype(np.float32)))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    model.eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    w = layer.base_layer.weight.detach().numpy().T
    spec = jlora.IA3(targets=".*kernel", feedforward=".*kernel" if feedforward else None)
    ad = jlora.apply({"params": {"proj": {"kernel": jnp.asarray(w)}}}, spec)
    node = ad["params"]["proj"]["kernel"]
    node = node.with_(extra={"default": {"l": jnp.asarray(l.detach().numpy().reshape(-1))}})
    fwd = lambda p, x: x @ p["params"]["proj"]["kernel"]
    got = jlora.lift(fwd, strict=True)({"params": {"proj": {"kernel": node}}}, jnp.asarray(x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
