"""jlora.train.make_step: learning, frozen leaves untouched, accumulation, donation, errors."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.core.nodes import is_adapter_leaf
from jlora.distributed import make_mesh
from jlora.train import init_opt_state, make_step


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(4)(x)


def _setup(rank=4, **spec_kwargs):
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = x @ jax.random.normal(jax.random.key(2), (16, 4))  # a task the random frozen MLP does not solve
    params = model.init(jax.random.key(0), x)["params"]
    spec = jlora.LoRA(rank=rank, alpha=2.0 * rank, targets=r".*kernel", **spec_kwargs)
    adapted = jlora.apply(params, spec, key=jax.random.key(3))
    forward = jlora.lift(model.apply)

    def loss_fn(p, batch, key):
        pred = forward({"params": p}, batch["x"])
        err = pred - batch["y"]
        return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}

    return model, params, adapted, loss_fn, {"x": x, "y": y}


def _copy(tree):
    return jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), tree)


def _snapshot(tree):
    return jax.tree_util.tree_map(lambda v: np.array(v, copy=True), tree)


def _factors(tree):
    """{(path, 'a'|'b', name): array} for every factor held in ``tree``."""
    out = {}
    for path, leaf in jlora.core.paths.flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0]:
        if jlora.is_node(leaf):
            for kind in ("a", "b"):
                for name, v in getattr(leaf, kind).items():
                    if v is not None:
                        out[(path, kind, name)] = np.asarray(v)
    return out


def test_lora_learns_and_frozen_leaves_are_untouched():
    model, params, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    frozen_before = _snapshot(frozen)
    factors_before = _factors(trainable)
    assert len(factors_before) == 6  # 3 kernels x (a, b)
    frozen_loss = float(jnp.mean((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2))

    optimizer = optax.adam(1e-2)
    step = make_step(loss_fn, optimizer)
    opt_state = init_opt_state(optimizer, trainable)
    losses = []
    for i in range(200):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert set(metrics) == {"loss", "grad_norm", "skipped", "mae"}
    assert np.isfinite(float(metrics["grad_norm"]))
    # B starts at zero, so the first step sees exactly the frozen model.
    np.testing.assert_allclose(losses[0], frozen_loss, rtol=1e-5)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])

    # Frozen leaves (bases, biases) are bitwise untouched.
    frozen_after = _snapshot(frozen)
    for a, b in zip(jax.tree_util.tree_leaves(frozen_before), jax.tree_util.tree_leaves(frozen_after)):
        assert np.array_equal(a, b)
    assert jax.tree_util.tree_structure(frozen_before) == jax.tree_util.tree_structure(frozen_after)
    # Only adapter leaves are trained, and every one of them moved.
    factors_after = _factors(trainable)
    assert factors_after.keys() == factors_before.keys()
    for k in factors_before:
        assert not np.array_equal(factors_before[k], factors_after[k]), k
    assert all(jlora.is_node(leaf) for leaf in jax.tree_util.tree_leaves(trainable, is_leaf=is_adapter_leaf))
    # The merged model reproduces the final loss: only the adapters carry what was learned.
    merged = jlora.merge(jlora.combine(trainable, frozen))
    for path_leaf, orig in zip(jax.tree_util.tree_leaves_with_path(merged), jax.tree_util.tree_leaves(params)):
        path, leaf = path_leaf
        if "bias" in jax.tree_util.keystr(path):
            assert np.array_equal(np.asarray(leaf), np.asarray(orig))
    final = float(jnp.mean((model.apply({"params": merged}, batch["x"]) - batch["y"]) ** 2))
    assert final < 0.5 * frozen_loss


def test_train_also_leaves_are_updated():
    _, _, adapted, loss_fn, batch = _setup(train_also=r".*Dense_2/bias")
    trainable, frozen = jlora.partition(adapted)
    bias_before = np.asarray(trainable["Dense_2"]["bias"].value).copy()
    optimizer = optax.sgd(0.05)
    step = make_step(loss_fn, optimizer)
    trainable, _, _ = step(trainable, frozen, init_opt_state(optimizer, trainable), batch)
    assert isinstance(trainable["Dense_2"]["bias"], jlora.Trainable)
    assert not np.array_equal(bias_before, np.asarray(trainable["Dense_2"]["bias"].value))
    assert frozen["Dense_2"]["bias"] is None and frozen["Dense_1"]["bias"] is not None


def _nonzero_b(trainable):
    """B starts at zero (so A's first gradient is zero); give it values so every factor gets a gradient."""
    def fill(leaf):
        if jlora.is_node(leaf):
            b = {n: (None if v is None else 0.1 * jax.random.normal(jax.random.key(7), v.shape, v.dtype))
                 for n, v in leaf.b.items()}
            return leaf.with_(b=b)
        return leaf
    return jax.tree_util.tree_map(fill, trainable, is_leaf=is_adapter_leaf)


def test_accumulation_matches_full_batch():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    trainable = _nonzero_b(trainable)
    optimizer = optax.sgd(0.05)

    def run(accum):
        t, o = _copy(trainable), init_opt_state(optimizer, _copy(trainable))
        step = make_step(loss_fn, optimizer, accum_steps=accum)
        metrics = []
        for _ in range(3):
            t, o, m = step(t, frozen, o, batch, jax.random.key(0))
            metrics.append(m)
        return t, metrics

    full, m_full = run(1)
    acc, m_acc = run(4)
    # not a vacuous comparison: the params moved
    assert not np.allclose(_factors(full)[("Dense_0/kernel", "a", "default")],
                           _factors(trainable)[("Dense_0/kernel", "a", "default")])
    chex.assert_trees_all_close(acc, full, atol=1e-5, rtol=1e-5)
    for a, b in zip(m_acc, m_full):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
        np.testing.assert_allclose(a["mae"], b["mae"], rtol=1e-5)


def test_accumulation_micro_batches_are_strided():
    seen = []

    def loss_fn(p, batch, key):
        jax.debug.callback(lambda v: seen.append(np.asarray(v)), batch["i"])
        return jnp.sum(p["w"].value ** 2) * 0.0 + jnp.mean(batch["i"].astype(jnp.float32))

    trainable = {"w": jlora.Trainable(jnp.ones((2,)), "w")}
    optimizer = optax.sgd(0.1)
    step = make_step(loss_fn, optimizer, accum_steps=2)
    _, _, m = step(trainable, {"w": None}, optimizer.init(trainable), {"i": jnp.arange(8)})
    jax.effects_barrier()
    assert [s.tolist() for s in seen] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    np.testing.assert_allclose(m["loss"], 3.5)


def test_donation_and_no_donation():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    optimizer = optax.adam(1e-3)
    kept = _copy(trainable)
    step = make_step(loss_fn, optimizer, donate=False)
    step(kept, frozen, init_opt_state(optimizer, kept), batch)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(kept))

    donated = _copy(trainable)
    opt_state = init_opt_state(optimizer, donated)
    step = make_step(loss_fn, optimizer)
    new, new_state, _ = step(donated, frozen, opt_state, batch)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(donated))
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(opt_state) if np.ndim(x) > 0)
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(frozen))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(new))


def test_single_device_mesh_matches_plain_step():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    trainable = _nonzero_b(trainable)
    optimizer = optax.adam(1e-2)
    mesh = make_mesh((1,), ("data",))
    plain = make_step(loss_fn, optimizer, accum_steps=2)
    meshed = make_step(loss_fn, optimizer, accum_steps=2, mesh=mesh,
                       rules=[(r"kernel$", jax.sharding.PartitionSpec("data", None))])
    t1, o1, m1 = plain(_copy(trainable), frozen, init_opt_state(optimizer, trainable), batch)
    t2, o2, m2 = meshed(_copy(trainable), frozen, init_opt_state(optimizer, trainable, mesh=mesh), batch)
    chex.assert_trees_all_close(t1, t2, atol=1e-6)
    chex.assert_trees_all_close(o1, o2, atol=1e-6)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    assert t2["Dense_0"]["kernel"].a["default"].sharding.spec == jax.sharding.PartitionSpec("data", None)


# ------------------------------------------------------------------------------------------
# errors at the boundary

def test_indivisible_batch_names_both_numbers():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    optimizer = optax.sgd(0.1)
    step = make_step(loss_fn, optimizer, accum_steps=4)
    bad = {"x": batch["x"][:10], "y": batch["y"][:10]}
    with pytest.raises(ValueError, match=r"leading dim 10.*accum_steps=4"):
        step(trainable, frozen, optimizer.init(trainable), bad)


def test_rejects_mixed_up_trees():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    optimizer = optax.sgd(0.1)
    step = make_step(loss_fn, optimizer)
    with pytest.raises(ValueError, match="jlora.partition"):
        step(adapted, frozen, optimizer.init(trainable), batch)
    with pytest.raises(ValueError, match="in that order|frozen base"):
        step(frozen, trainable, optimizer.init(trainable), batch)
    with pytest.raises(ValueError, match="not the adapted tree"):
        init_opt_state(optimizer, adapted)


def test_bad_loss_outputs_and_arguments():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    optimizer = optax.sgd(0.1)

    def vector_loss(p, b, k):
        return loss_fn(p, b, k)[0] * jnp.ones(3)

    with pytest.raises(ValueError, match=r"scalar loss, got shape \(3,\)"):
        make_step(vector_loss, optimizer)(trainable, frozen, optimizer.init(trainable), batch)

    def reserved(p, b, k):
        return loss_fn(p, b, k)[0], {"loss": 1.0}

    with pytest.raises(ValueError, match="reserved"):
        make_step(reserved, optimizer)(trainable, frozen, optimizer.init(trainable), batch)

    with pytest.raises(ValueError, match="accum_steps"):
        make_step(loss_fn, optimizer, accum_steps=0)
    with pytest.raises(TypeError, match="GradientTransformation"):
        make_step(loss_fn, "adam")
    with pytest.raises(ValueError, match="needs a mesh"):
        make_step(loss_fn, optimizer, rules=[(r"kernel", jax.sharding.PartitionSpec())])


# ------------------------------------------------------------------------------------------
# adapter_update: a method's own per-step update inside the jitted step

class _ShrinkB:
    """A toy adapter_update: adds 0.1 * sum(b^2) to the loss, then after the optimizer scales every
    B by 0.5 on even steps, and counts the steps it saw (its carried state)."""

    metric_names = ("seen",)

    def init(self, trainable):
        return {"seen": jnp.zeros((), jnp.int32), "last_step": jnp.full((), -1, jnp.int32)}

    def loss(self, trainable):
        return 0.1 * sum(jnp.sum(jnp.square(v)) for _, kind, _, v in _iter_factors(trainable) if kind == "b")

    def update(self, state, trainable, grads, step):
        factor = jnp.where(step % 2 == 0, 0.5, 1.0)

        def one(leaf):
            if jlora.is_node(leaf):
                return leaf.with_(b={n: v * factor for n, v in leaf.b.items()})
            return leaf

        trainable = jax.tree_util.tree_map(one, trainable, is_leaf=is_adapter_leaf)
        state = {"seen": state["seen"] + 1, "last_step": step}
        return trainable, state, {"seen": state["seen"]}


def _iter_factors(tree):
    for path, leaf in jlora.core.paths.flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0]:
        if jlora.is_node(leaf):
            for kind in ("a", "b"):
                for name, v in getattr(leaf, kind).items():
                    if v is not None:
                        yield path, kind, name, v


def test_adapter_update_runs_in_the_step_with_its_state_and_loss():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    trainable = _nonzero_b(trainable)
    optimizer = optax.sgd(0.0)          # no optimizer movement: what changes is the hook's doing
    hook = _ShrinkB()
    step = make_step(loss_fn, optimizer, adapter_update=hook, donate=False)
    state = init_opt_state(optimizer, trainable, adapter_update=hook)
    assert isinstance(state, jlora.train.StepState) and int(state.step) == 0
    b0 = {p: np.asarray(v) for p, kind, _, v in _iter_factors(trainable) if kind == "b"}
    task_loss = float(loss_fn(jlora.combine(trainable, frozen), batch, None)[0])
    t1, s1, m1 = step(trainable, frozen, state, batch)
    expected_add = 0.1 * sum(float(np.sum(v ** 2)) for v in b0.values())
    np.testing.assert_allclose(float(m1["adapter_loss"]), expected_add, rtol=1e-5)
    np.testing.assert_allclose(float(m1["loss"]), task_loss + expected_add, rtol=1e-5)
    assert int(m1["seen"]) == 1 and int(s1.step) == 1 and int(s1.adapter_state["last_step"]) == 0
    for p, kind, _, v in _iter_factors(t1):
        if kind == "b":
            np.testing.assert_allclose(np.asarray(v), 0.5 * b0[p], rtol=1e-6)   # step 0: halved
    t2, s2, m2 = step(t1, frozen, s1, batch)
    for p, kind, _, v in _iter_factors(t2):
        if kind == "b":
            np.testing.assert_allclose(np.asarray(v), 0.5 * b0[p], rtol=1e-6)   # step 1: kept
    assert int(s2.step) == 2 and int(s2.adapter_state["last_step"]) == 1 and int(m2["seen"]) == 2
    assert step.log_metrics == ("seen", "adapter_loss")
    # the loss add-on is differentiated: with sgd, b moves by -lr * 0.2 * b on top of the task gradient
    lr_step = make_step(loss_fn, optax.sgd(0.1), adapter_update=hook, donate=False)
    plain = make_step(loss_fn, optax.sgd(0.1), donate=False)
    tp, _, _ = plain(trainable, frozen, optax.sgd(0.1).init(trainable), batch)
    th, _, _ = lr_step(trainable, frozen, lr_step.init(trainable), batch)
    bp = {p: np.asarray(v) for p, kind, _, v in _iter_factors(tp) if kind == "b"}
    for p, kind, _, v in _iter_factors(th):
        if kind == "b":
            np.testing.assert_allclose(np.asarray(v), 0.5 * (bp[p] - 0.1 * 0.2 * b0[p]), rtol=1e-5, atol=1e-7)


def test_adapter_update_with_accumulation_and_mesh_and_errors():
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    trainable = _nonzero_b(trainable)
    optimizer = optax.adam(1e-2)
    hook = _ShrinkB()
    one = make_step(loss_fn, optimizer, adapter_update=hook, donate=False)
    acc = make_step(loss_fn, optimizer, adapter_update=hook, accum_steps=2, donate=False)
    meshed = make_step(loss_fn, optimizer, adapter_update=hook, mesh=make_mesh((1,), ("data",)), donate=False)
    t1, s1, m1 = one(trainable, frozen, one.init(trainable), batch)
    t2, s2, m2 = acc(trainable, frozen, acc.init(trainable), batch)
    t3, s3, m3 = meshed(trainable, frozen, meshed.init(trainable), batch)
    chex.assert_trees_all_close(t1, t2, atol=1e-5)
    chex.assert_trees_all_close(t1, t3, atol=1e-6)
    np.testing.assert_allclose(float(m1["adapter_loss"]), float(m2["adapter_loss"]), rtol=1e-6)
    assert int(s3.step) == 1 and int(s2.adapter_state["seen"]) == 1
    with pytest.raises(TypeError, match="init_opt_state"):
        one(trainable, frozen, optimizer.init(trainable), batch)
    with pytest.raises(TypeError, match="built without adapter_update"):
        make_step(loss_fn, optimizer)(trainable, frozen, one.init(trainable), batch)
    with pytest.raises(TypeError, match="lacks \\['update'\\]"):
        make_step(loss_fn, optimizer, adapter_update=type("H", (), {"init": lambda self, t: 0})())

    class Clash(_ShrinkB):
        def update(self, state, trainable, grads, step):
            return trainable, state, {"mae": jnp.zeros(())}

    with pytest.raises(ValueError, match="clash"):
        make_step(loss_fn, optimizer, adapter_update=Clash())(trainable, frozen, init_opt_state(
            optimizer, trainable, adapter_update=Clash()), batch)



@pytest.mark.parametrize("accum_steps", [1, 2])
def test_nonfinite_batch_is_skipped_and_state_kept(accum_steps):
    """One NaN batch (or an Inf loss) leaves trainable and optimizer state bit-equal to before, and the
    next good batch trains as if the bad one never came."""
    _, _, adapted, loss_fn, batch = _setup()
    trainable, frozen = jlora.partition(adapted)
    opt = optax.adam(1e-2)
    step = make_step(loss_fn, opt, accum_steps=accum_steps)
    opt_state = opt.init(trainable)
    trainable, opt_state, m = step(trainable, frozen, opt_state, batch, jax.random.key(0))
    assert int(m["skipped"]) == 0
    before_t, before_o = _snapshot(trainable), _snapshot(opt_state)
    bad = {"x": batch["x"].at[3, 5].set(jnp.nan), "y": batch["y"]}
    trainable, opt_state, m = step(trainable, frozen, opt_state, bad, jax.random.key(1))
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    chex.assert_trees_all_equal(_snapshot(trainable), before_t)
    chex.assert_trees_all_equal(_snapshot(opt_state), before_o)
    # the reference: the same good step with the bad one never taken
    ref_t, ref_o = _copy(before_t), _copy(before_o)
    ref_t, ref_o, _ = step(ref_t, frozen, ref_o, batch, jax.random.key(2))
    trainable, opt_state, m = step(trainable, frozen, opt_state, batch, jax.random.key(2))
    assert int(m["skipped"]) == 0
    chex.assert_trees_all_equal(_snapshot(trainable), _snapshot(ref_t))


def test_nonfinite_skip_keeps_adapter_state_and_can_be_turned_off():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    model = nn.Dense(4)
    params = model.init(jax.random.key(1), x)
    spec = jlora.AdaLoRA(init_r=4, target_r=2, total_steps=10, tinit=1, targets=r".*kernel")
    trainable, frozen = jlora.partition(jlora.apply(params, spec, key=jax.random.key(2)))
    forward = jlora.lift(model.apply)
    loss = lambda p, b, k: jnp.mean(forward(p, b) ** 2)
    step = make_step(loss, optax.adam(1e-2), adapter_update=jlora.adalora_allocator(spec))
    state = step.init(trainable)
    trainable, state, _ = step(trainable, frozen, state, x)
    count = int(state.step)
    trainable, state, m = step(trainable, frozen, state, x.at[0, 0].set(jnp.inf))
    assert int(m["skipped"]) == 1 and int(state.step) == count  # a skipped step does not advance the schedule
    raw = make_step(loss, optax.adam(1e-2), skip_nonfinite=False, adapter_update=jlora.adalora_allocator(spec))
    trainable, state, m = raw(trainable, frozen, state, x.at[0, 0].set(jnp.nan))
    assert "skipped" not in m
    assert not all(np.isfinite(np.asarray(v)).all() for v in jax.tree_util.tree_leaves(trainable))
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False, got 1"):
        make_step(loss, optax.adam(1e-2), skip_nonfinite=1)
