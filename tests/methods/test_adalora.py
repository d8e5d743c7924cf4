"""jlora.AdaLoRA: init and validation as PEFT's AdaLoraConfig / AdaLoraLayer; the rank allocator
(importance EMA, triplet scores, cubic budget, masking, the phases of update_and_allocate) against a
NumPy re-implementation of PEFT's RankAllocator written from peft/tuners/adalora/{layer,model}.py;
the orthogonality regulariser; a training run inside the jitted step where the ranks really go
from b0 to the target budget; truncated save / reload."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.core.nodes import is_adapter_leaf
from jlora.core.paths import flatten_with_paths
from jlora.methods import adalora as ad

# ---------------------------------------------------------------------------------------------
# NumPy reference: PEFT's RankAllocator + AdaLoraModel.update_and_allocate, PyTorch layout
# (lora_A: (r, in), lora_B: (out, r), lora_E: (r, 1)); one entry per module.


class NumpyRankAllocator:
    def __init__(self, cfg, ranks):
        self.cfg = cfg
        self.init_bgt = sum(ranks.values())
        self.target_bgt = cfg["target_r"] * len(ranks)
        self.reset_ipt()
        self.rank_pattern = None

    def reset_ipt(self):
        self.ipt, self.exp_avg_ipt, self.exp_avg_unc = {}, {}, {}

    def budget_schedule(self, step):
        tinit, tfinal, total = self.cfg["tinit"], self.cfg["tfinal"], self.cfg["total_step"]
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % self.cfg["deltaT"] == 0

    def update_ipt(self, params, grads):
        b1, b2 = self.cfg["beta1"], self.cfg["beta2"]
        for n, p in params.items():
            if n not in self.ipt:
                self.ipt[n] = np.zeros_like(p)
                self.exp_avg_ipt[n] = np.zeros_like(p)
                self.exp_avg_unc[n] = np.zeros_like(p)
            self.ipt[n] = np.abs(p * grads[n])
            self.exp_avg_ipt[n] = b1 * self.exp_avg_ipt[n] + (1 - b1) * self.ipt[n]
            self.exp_avg_unc[n] = b2 * self.exp_avg_unc[n] + (1 - b2) * np.abs(self.ipt[n] - self.exp_avg_ipt[n])

    def element_score(self, n):
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def triplet_scores(self, modules):
        out = {}
        for m in modules:
            ipt_a = np.mean(self.element_score(f"{m}.lora_A"), axis=1, keepdims=True)       # (r, 1)
            ipt_b = np.mean(self.element_score(f"{m}.lora_B"), axis=0).reshape(-1, 1)        # (r, 1)
            ipt_ab = np.concatenate([ipt_a, ipt_b], axis=1).sum(axis=1)
            out[m] = self.element_score(f"{m}.lora_E").reshape(-1) + ipt_ab
        return out

    def mask_to_budget(self, params, budget, modules):
        triplet = self.triplet_scores(modules)
        allscores = np.concatenate([triplet[m] for m in modules])
        threshold = np.sort(allscores)[self.init_bgt - budget - 1]          # torch.kthvalue, k >= 1
        pattern = {}
        for m in modules:
            masked = triplet[m] <= threshold
            params[f"{m}.lora_E"][masked[:, None]] = 0.0
            pattern[m] = ~masked
        return pattern, threshold

    def update_and_allocate(self, params, grads, step, modules):
        """AdaLoraModel.update_and_allocate(global_step) -> (budget, threshold or None)."""
        final = self.cfg["total_step"] - self.cfg["tfinal"]
        if step < final:
            self.update_ipt(params, grads)
            budget, mask_ind = self.budget_schedule(step)
            if mask_ind:
                self.rank_pattern, thr = self.mask_to_budget(params, budget, modules)
                return budget, thr
            return budget, None
        if step == final:
            budget, _ = self.budget_schedule(step)
            self.rank_pattern, thr = self.mask_to_budget(params, budget, modules)
            self.reset_ipt()
            return budget, thr
        for m in modules:
            params[f"{m}.lora_E"][~self.rank_pattern[m][:, None]] = 0.0
        return self.target_bgt, None


# ---------------------------------------------------------------------------------------------
# a tree with a 2-D kernel, a stacked (2 layers) kernel and a (in, heads, head_dim) kernel

SHAPES = {"dense": (12, 9), "stacked": (2, 8, 10), "heads": (11, 3, 4)}
AXES = {r".*/stacked/kernel": jlora.Axes(stack=1, inputs=1), r".*/heads/kernel": jlora.Axes(stack=0, inputs=1)}


def _tree_params():
    r = np.random.default_rng(0)
    return {"params": {k: {"kernel": jnp.asarray(r.standard_normal(s), jnp.float32)} for k, s in SHAPES.items()}}


def _torch_modules(trainable, name="default"):
    """{module: {lora_A, lora_B, lora_E}} (PyTorch layout, float32 NumPy) with one module per layer
    slice; and the inverse map back to jlora paths."""
    out = {}
    for path, node in flatten_with_paths(trainable, is_leaf=is_adapter_leaf)[0]:
        if not jlora.is_node(node):
            continue
        lay = node.layout
        a, b, e = (np.asarray(node.a[name]), np.asarray(node.b[name]), np.asarray(node.extra[name]["e"]))
        r = a.shape[-1]
        slices = [()] if lay.stack == 0 else [(i,) for i in range(a.shape[0])]
        for sl in slices:
            m = path + "".join(f".{i}" for i in sl)
            out[m] = {"lora_A": a[sl].reshape(-1, r).T.copy(), "lora_B": b[sl].reshape(r, -1).T.copy(),
                      "lora_E": e[sl].reshape(r, 1).copy()}
    return out


def _flat_torch(mods):
    return {f"{m}.{k}": v for m, d in mods.items() for k, v in d.items()}


def _with_values(tree, values, name="default"):
    """``tree`` with each node's a / b / e replaced by ``values[path]`` = (a, b, e)."""
    def one(path, leaf):
        if not jlora.is_node(leaf) or path not in values:
            return leaf
        a, b, e = values[path]
        return leaf.with_(a={**leaf.a, name: jnp.asarray(a)}, b={**leaf.b, name: jnp.asarray(b)},
                          extra={**leaf.extra, name: {"e": jnp.asarray(e)}})
    flat, treedef = flatten_with_paths(tree, is_leaf=is_adapter_leaf)
    return jax.tree_util.tree_unflatten(treedef, [one(p, l) for p, l in flat])


def _random_values(trainable, rng, scale=1.0):
    out = {}
    for path, node in flatten_with_paths(trainable, is_leaf=is_adapter_leaf)[0]:
        if jlora.is_node(node):
            a, b, e = node.a["default"], node.b["default"], node.extra["default"]["e"]
            # per-slice scales so that modules differ in importance
            lead = (a.shape[0],) if node.layout.stack else ()
            s = rng.uniform(0.2, 2.0, lead + (1,) * (a.ndim - len(lead)))
            out[path] = tuple((scale * rng.standard_normal(x.shape) * s.reshape(lead + (1,) * (x.ndim - len(lead)))
                               ).astype(np.float32) for x in (a, b, e))
    return out


def test_allocator_matches_numpy_rank_allocator_over_every_phase():
    T, tinit, tfinal, delta_t = 14, 2, 4, 3
    spec = jlora.AdaLoRA(init_r=5, target_r=2, total_steps=T, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                         beta1=0.8, beta2=0.7, targets=r".*kernel", axes=AXES)
    adapted = jlora.apply(_tree_params(), spec, key=jax.random.key(0))
    trainable, _ = jlora.partition(adapted)
    alloc = jlora.adalora_allocator(spec)
    state = alloc.init(trainable)
    assert alloc.budgets(trainable) == (20, 8)          # 4 modules (the stacked kernel counts twice)

    ref = NumpyRankAllocator(dict(target_r=2, tinit=tinit, tfinal=tfinal, total_step=T, deltaT=delta_t,
                                  beta1=0.8, beta2=0.7), {m: 5 for m in _torch_modules(trainable)})
    update = jax.jit(alloc.update)
    rng = np.random.default_rng(1)
    masked_steps, thresholds = [], []
    final_pattern = None
    for t in range(T + 2):
        params_t = _with_values(trainable, _random_values(trainable, rng))   # "after the optimizer step"
        grads_t = _with_values(trainable, _random_values(trainable, rng, scale=0.5))
        torch_params = _flat_torch(_torch_modules(params_t))
        torch_grads = _flat_torch(_torch_modules(grads_t))
        budget, thr = ref.update_and_allocate(torch_params, torch_grads, t, list(_torch_modules(trainable)))

        new_params, state, metrics = update(state, params_t, grads_t, jnp.int32(t))

        assert int(metrics["adalora_budget"]) == budget, t
        if thr is None:
            assert np.isnan(float(metrics["adalora_threshold"])), t
        else:
            masked_steps.append(t)
            thresholds.append(thr)
            np.testing.assert_allclose(float(metrics["adalora_threshold"]), thr, rtol=1e-5)
        got = _flat_torch(_torch_modules(new_params))
        for k, v in torch_params.items():
            if k.endswith("lora_E"):
                np.testing.assert_array_equal(got[k] == 0, v == 0, err_msg=f"step {t} {k}")
            np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=0, err_msg=f"step {t} {k}")
        assert int(metrics["adalora_rank"]) == sum(int(np.sum(v != 0)) for k, v in got.items() if k.endswith("lora_E"))
        if ref.exp_avg_ipt:  # the smoothed importance and uncertainty, element by element
            state_t = {"exp_avg_ipt": state.ipt, "exp_avg_unc": state.unc}
            for which, tree in state_t.items():
                mine = _torch_modules(_with_values(trainable, {p: (v["a"], v["b"], v["e"]) for p, v in tree.items()}))
                for k, v in _flat_torch(mine).items():
                    np.testing.assert_allclose(v, getattr(ref, which)[k], rtol=2e-5, atol=1e-9, err_msg=f"{t} {which} {k}")
        else:  # reset at T - tfinal (PEFT's reset_ipt) and never updated again
            assert t >= T - tfinal
            assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree_util.tree_leaves((state.ipt, state.unc)))
        if t == T - tfinal:
            final_pattern = {k: v == 0 for k, v in got.items() if k.endswith("lora_E")}
            kept = sum(int(np.sum(~v)) for v in final_pattern.values())
            assert kept == 8                                  # the target budget, exactly
        if t > T - tfinal:                                    # the frozen final pattern is re-applied
            for k, z in final_pattern.items():
                np.testing.assert_array_equal(got[k] == 0, z | (torch_params[k] == 0))
    # masking happened on tinit < t < T - tfinal with t % delta_t == 0, and at T - tfinal
    assert masked_steps == [3, 6, 9, 10]
    # T - tfinal masks with the scores of the step before (no update there) at the same budget b(9) = bT
    assert thresholds[-1] == thresholds[-2] and len(set(thresholds[:3])) == 3


def test_budget_schedule_is_peft_exactly():
    spec = jlora.AdaLoRA(init_r=12, target_r=8, total_steps=300, tinit=20, tfinal=50, delta_t=10, targets="x")
    ref = NumpyRankAllocator(dict(target_r=8, tinit=20, tfinal=50, total_step=300, deltaT=10), {i: 12 for i in range(37)})
    b0, bT = 12 * 37, 8 * 37
    seen = [ad.budget_schedule(spec, t, b0, bT) for t in range(0, 320)]
    assert seen == [ref.budget_schedule(t) for t in range(0, 320)]
    assert seen[20] == (b0, False) and seen[21][0] < b0 and seen[250][0] == bT and seen[251] == (bT, True)
    assert [b for b, _ in seen[21:251]] == sorted([b for b, _ in seen[21:251]], reverse=True)


def test_mask_threshold_is_kth_smallest_and_k0_masks_nothing():
    scores = {"a": jnp.array([0.5, 0.1, 0.9]), "b": jnp.array([[0.3, 0.7], [0.2, 0.05]])}
    assert float(ad.mask_threshold(scores, 3)) == pytest.approx(0.2)
    assert float(ad.mask_threshold(scores, 7)) == pytest.approx(0.9)
    assert float(ad.mask_threshold(scores, 0)) == -np.inf


def test_orthogonal_regulariser_against_numpy():
    spec = jlora.AdaLoRA(init_r=4, target_r=2, total_steps=10, orth_reg_weight=0.3, targets=r".*kernel", axes=AXES)
    trainable, _ = jlora.partition(jlora.apply(_tree_params(), spec, key=jax.random.key(0)))
    trainable = _with_values(trainable, _random_values(trainable, np.random.default_rng(2), scale=0.3))
    mods = _torch_modules(trainable)
    norms = []
    for m in mods.values():
        A, B = m["lora_A"].astype(np.float64), m["lora_B"].astype(np.float64)
        norms.append(np.linalg.norm(A @ A.T - np.eye(4), "fro"))   # PEFT: p @ p.T for lora_A
        norms.append(np.linalg.norm(B.T @ B - np.eye(4), "fro"))   # PEFT: p.T @ p for lora_B
    assert len(norms) == 8                                            # 4 modules (stacked slices count), A and B
    expected = 0.3 * np.mean(norms)
    alloc = jlora.adalora_allocator(spec)
    np.testing.assert_allclose(float(alloc.loss(trainable)), expected, rtol=1e-5)
    # not the squared norm
    assert abs(expected - 0.3 * np.mean(np.square(norms))) > 1e-3
    # finite gradient, also at an exactly orthogonal point (where the norm is 0)
    eye = {p: (np.eye(*np.shape(v[0])[-2:], dtype=np.float32) * np.ones(np.shape(v[0]), np.float32),
               np.eye(*np.shape(v[1])[-2:], dtype=np.float32) * np.ones(np.shape(v[1]), np.float32), v[2])
           for p, v in _random_values(trainable, np.random.default_rng(3)).items() if p.endswith("stacked/kernel")}
    ortho = _with_values(trainable, eye)
    g = jax.grad(alloc.loss)(ortho)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))
    spec0 = jlora.AdaLoRA(init_r=4, target_r=2, total_steps=10, orth_reg_weight=0.0, targets=r".*kernel", axes=AXES)
    assert float(jlora.adalora_allocator(spec0).loss(trainable)) == 0.0


# ---------------------------------------------------------------------------------------------
# spec: PEFT defaults, validation, init


def test_defaults_and_validation_name_the_bad_value():
    spec = jlora.AdaLoRA(total_steps=100, targets="query")
    assert (spec.init_r, spec.target_r, spec.tinit, spec.tfinal, spec.delta_t, spec.beta1, spec.beta2,
            spec.orth_reg_weight, spec.alpha, spec.dropout) == (12, 8, 0, 0, 1, 0.85, 0.85, 0.5, 8.0, 0.0)
    assert spec.scale == pytest.approx(8 / (12 + 1e-5))
    bad = [
        (dict(), "total_steps=None"),
        (dict(total_steps=0), "total_steps=0"),
        (dict(total_steps=100, tinit=60, tfinal=40), "tinit=60 must be < total_steps - tfinal = 100 - 40 = 60"),
        (dict(total_steps=100, beta1=1.0), "beta1 must be in \\(0, 1\\), got 1.0"),
        (dict(total_steps=100, beta2=0), "beta2 must be in \\(0, 1\\), got 0"),
        (dict(total_steps=100, target_r=13), "target_r must be an int in \\[0, init_r=12\\], got 13"),
        (dict(total_steps=100, init_r=0), "init_r must be a positive int, got 0"),
        (dict(total_steps=100, orth_reg_weight=-0.1), "orth_reg_weight must be a finite number >= 0, got -0.1"),
        (dict(total_steps=100, delta_t=0), "delta_t must be a positive int, got 0"),
        (dict(total_steps=100, tfinal=-1), "tfinal must be a non-negative int, got -1"),
        (dict(total_steps=100, dropout=1.0), "dropout must be in \\[0, 1\\), got 1.0"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            jlora.AdaLoRA(targets="query", **kwargs)
    with pytest.raises(TypeError, match="jlora.AdaLoRA spec"):
        jlora.adalora_allocator(jlora.LoRA(rank=2, targets="query"))


def test_init_is_peft_and_a_noop():
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 192)), jnp.float32)
    params = {"params": {"lin": {"kernel": w}}}
    spec = jlora.AdaLoRA(init_r=12, alpha=16, total_steps=10, targets=r".*kernel")
    node = jlora.apply(params, spec, key=jax.random.key(0))["params"]["lin"]["kernel"]
    meta = node.meta["default"]
    assert (meta.method, meta.rank) == ("adalora", 12)
    assert meta.scale == pytest.approx(16 / (12 + 1e-5))
    a, b, e = np.asarray(node.a["default"]), np.asarray(node.b["default"]), np.asarray(node.extra["default"]["e"])
    assert a.shape == (256, 12) and b.shape == (12, 192) and e.shape == (12,)
    assert np.all(e == 0)
    for x in (a, b):
        assert abs(x.std() - 0.02) < 0.002 and abs(x.mean()) < 0.002
    np.testing.assert_array_equal(np.asarray(jlora.merge({"k": node})["k"]), np.asarray(w))
    trainable, frozen = jlora.partition({"k": node})
    assert set(trainable["k"].extra["default"]) == {"e"} and frozen["k"].extra["default"]["e"] is None
    with pytest.raises(ValueError, match="init_r=12 .* exceeds min"):
        jlora.apply({"params": {"lin": {"kernel": jnp.ones((8, 40))}}}, spec, key=0)


# ---------------------------------------------------------------------------------------------
# a real training run inside the jitted step


def _model(variables, x):
    """A 2-D kernel, then three scanned layers (a stacked (3, 24, 24) kernel), then a head."""
    p = variables["params"]
    h = jnp.tanh(x @ p["inp"]["kernel"])

    def body(h, k):
        return jnp.tanh(h @ k) + h, None

    h, _ = jax.lax.scan(body, h, p["blocks"]["kernel"])
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _problem():
    r = np.random.default_rng(0)
    params = {"params": {"inp": {"kernel": jnp.asarray(r.standard_normal((16, 24)) / 4, jnp.float32)},
                         "blocks": {"kernel": jnp.asarray(r.standard_normal((3, 24, 24)) / 5, jnp.float32)},
                         "head": {"kernel": jnp.asarray(r.standard_normal((24, 4)) / 5, jnp.float32),
                                  "bias": jnp.zeros((4,), jnp.float32)}}}
    x = jnp.asarray(r.standard_normal((128, 16)), jnp.float32)
    y = jnp.sin(x[:, :4] * 2.0) + x[:, 4:8] * x[:, 8:12]
    return params, x, y


T, TINIT, TFINAL = 40, 5, 10


@pytest.fixture(scope="module")
def trained():
    params, x, y = _problem()
    spec = jlora.AdaLoRA(init_r=6, target_r=2, total_steps=T, tinit=TINIT, tfinal=TFINAL, delta_t=1, alpha=12,
                         targets=r".*/(inp|blocks)/kernel")
    adapted = jlora.apply(params, spec, key=jax.random.key(1), model=_model, example=(x,))
    assert adapted["params"]["blocks"]["kernel"].layout == jlora.Layout(1, 1, 1)   # read off the scan
    forward = jlora.lift(_model)

    def loss_fn(p, batch, key):
        xb, yb = batch
        return jnp.mean((forward(p, xb) - yb) ** 2)

    alloc = jlora.adalora_allocator(spec)
    optimizer = optax.adam(2e-2)
    step = jlora.train.make_step(loss_fn, optimizer, adapter_update=alloc)
    trainable, frozen = jlora.partition(adapted)
    opt_state = jlora.train.init_opt_state(optimizer, trainable, adapter_update=alloc)
    history, e_history = [], []
    for i in range(T + 3):
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, (x, y), jax.random.key(i))
        history.append({k: float(v) for k, v in metrics.items()})
        e_history.append({p: np.asarray(n.extra["default"]["e"]) for p, n in ad._modules(trainable, "default")})
    return dict(spec=spec, params=params, x=x, y=y, forward=forward, trainable=trainable, frozen=frozen,
                opt_state=opt_state, history=history, e_history=e_history, loss_fn=loss_fn, alloc=alloc)


def test_training_run_ranks_really_go_from_b0_to_the_target(trained):
    h, spec = trained["history"], trained["spec"]
    b0, bT = 6 * 4, 2 * 4                                   # inp + 3 scanned layers = 4 modules
    ranks = [int(r["adalora_rank"]) for r in h]
    budgets = [int(r["adalora_budget"]) for r in h]
    assert budgets == [ad.budget_schedule(spec, t, b0, bT)[0] for t in range(T + 3)]
    assert ranks[TINIT] == b0                               # after warm-up every singular value is live
    # delta_t = 1: every step of the decreasing phase masks down to exactly the budget
    assert ranks[TINIT + 1:T - TFINAL + 1] == budgets[TINIT + 1:T - TFINAL + 1]
    assert ranks[-1] == bT and ranks[T - TFINAL:] == [bT] * (len(ranks) - T + TFINAL)
    final = trained["e_history"][T - TFINAL]
    for later in trained["e_history"][T - TFINAL:]:        # the final rank pattern is frozen
        for p in final:
            np.testing.assert_array_equal(later[p] == 0, final[p] == 0)
    kept = ad.kept_ranks(jlora.combine(trained["trainable"], trained["frozen"]))
    assert kept["params/inp/kernel"] + sum(kept["params/blocks/kernel"]) == bT
    assert len(kept["params/blocks/kernel"]) == 3
    assert h[-1]["loss"] < 0.5 * h[0]["loss"]
    assert h[0]["adapter_loss"] > 0 and math.isclose(
        h[0]["adapter_loss"], float(trained["alloc"].loss(jlora.partition(jlora.apply(
            trained["params"], spec, key=jax.random.key(1), model=_model, example=(trained["x"],)))[0])), rel_tol=1e-5)
    assert int(trained["opt_state"].step) == T + 3


def test_lifted_equals_merged(trained):
    adapted = jlora.combine(trained["trainable"], trained["frozen"])
    node = adapted["params"]["blocks"]["kernel"]
    assert np.any(np.asarray(node.extra["default"]["e"]) != 0)
    lifted = trained["forward"](adapted, trained["x"])
    merged = _model(jlora.merge(adapted), trained["x"])
    np.testing.assert_allclose(np.asarray(lifted), np.asarray(merged), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(merged), np.asarray(_model(trained["params"], trained["x"])), atol=1e-3)
    # delta = scale * (a * e) @ b, per layer slice
    a, b, e = (np.asarray(node.a["default"], np.float64), np.asarray(node.b["default"], np.float64),
               np.asarray(node.extra["default"]["e"], np.float64))
    expected = np.stack([(a[i] * e[i]) @ b[i] for i in range(3)]) * node.meta["default"].scale
    np.testing.assert_allclose(np.asarray(node.delta()), expected, rtol=1e-5, atol=1e-7)


def test_only_a_b_e_change_in_a_step(trained):
    params, x, y = _problem()
    spec = trained["spec"]
    adapted = jlora.apply(params, spec, key=jax.random.key(1), model=_model, example=(x,))
    trainable, frozen = jlora.partition(adapted)
    # start from the trained factors so every one of A, B, E has a gradient
    trainable = jax.tree_util.tree_map(lambda v: jnp.array(v, copy=True), trained["trainable"])
    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    before = {(p, k): np.array(v) for p, n in ad._modules(trainable, "default") for k, v in ad._parts(n, "default").items()}
    assert len(before) == 6 and all(n.base is None for _, n in ad._modules(trainable, "default"))
    optimizer = optax.sgd(1e-2)
    step = jlora.train.make_step(trained["loss_fn"], optimizer, adapter_update=trained["alloc"], donate=False)
    state = step.init(trainable)
    new, _, _ = step(trainable, frozen, state, (x, y), jax.random.key(0))
    after = {(p, k): np.array(v) for p, n in ad._modules(new, "default") for k, v in ad._parts(n, "default").items()}
    assert after.keys() == before.keys()
    for k in before:
        assert not np.array_equal(before[k], after[k]), k
    jax.tree_util.tree_map(np.testing.assert_array_equal, frozen_before, jax.tree_util.tree_map(np.array, frozen))
    # the trainable half holds A, B and E of the two adapted kernels and nothing else
    leaf_paths = sorted(p for p, _ in flatten_with_paths(new)[0])
    assert leaf_paths == sorted(f"params/{m}/kernel/{k}" for m in ("inp", "blocks")
                                for k in ("a/default", "b/default", "extra/default/e"))


def test_truncated_save_and_reload_give_the_same_outputs(trained, tmp_path):
    adapted = jlora.combine(trained["trainable"], trained["frozen"])
    kept = ad.kept_ranks(adapted)
    out_before = trained["forward"](adapted, trained["x"])
    path = jlora.io.save_adapter(str(tmp_path / "adalora"), adapted, spec=trained["spec"])
    meta = jlora.io.read_adapter_metadata(path)
    assert meta["spec"]["method"] == "adalora"
    assert meta["spec"]["rank_pattern"] == {"params/inp/kernel": kept["params/inp/kernel"],
                                            "params/blocks/kernel": kept["params/blocks/kernel"]}
    shapes = {n["path"]: (n["adapters"][0]["a"]["shape"], n["adapters"][0]["b"]["shape"],
                          n["adapters"][0]["extra"]["e"]["shape"], n["adapters"][0]["rank"]) for n in meta["nodes"]}
    r_inp, r_blocks = kept["params/inp/kernel"], max(kept["params/blocks/kernel"])
    assert shapes["params/inp/kernel"] == ([16, r_inp], [r_inp, 24], [r_inp], r_inp)
    assert shapes["params/blocks/kernel"] == ([3, 24, r_blocks], [3, r_blocks, 24], [3, r_blocks], r_blocks)
    assert r_inp < 6 and r_blocks < 6
    restored = jlora.io.load_adapter(path, trained["params"])
    node = restored["params"]["blocks"]["kernel"]
    assert node.meta["default"].scale == pytest.approx(12 / (6 + 1e-5))       # ranknum stays init_r
    assert ad.kept_ranks(restored) == kept
    np.testing.assert_allclose(np.asarray(trained["forward"](restored, trained["x"])), np.asarray(out_before),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jlora.merge(restored)["params"]["blocks"]["kernel"]),
                               np.asarray(jlora.merge(adapted)["params"]["blocks"]["kernel"]), rtol=1e-5, atol=1e-6)
    # an untrained adapter (E all zero, nothing allocated yet) is saved as it is
    fresh = jlora.apply(trained["params"], trained["spec"], key=0, model=_model, example=(trained["x"],))
    p2 = jlora.io.save_adapter(str(tmp_path / "fresh"), fresh, spec=trained["spec"])
    assert {n["adapters"][0]["rank"] for n in jlora.io.read_adapter_metadata(p2)["nodes"]} == {6}


def test_truncate_keeps_kept_triplets_first_and_pads_stacked_slices():
    spec = jlora.AdaLoRA(init_r=5, target_r=2, total_steps=10, targets=r".*kernel", axes=AXES)
    adapted = jlora.apply(_tree_params(), spec, key=jax.random.key(0))
    e_stacked = np.array([[0.0, 1.0, 0.0, 2.0, 3.0], [4.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    e_dense = np.array([0.0, 0.0, 5.0, 0.0, 0.0], np.float32)
    vals = {}
    for p, n in ad._modules(adapted, "default"):
        e = {"params/stacked/kernel": e_stacked, "params/dense/kernel": e_dense}.get(p, np.ones(5, np.float32))
        vals[p] = (n.a["default"], n.b["default"], e)
    adapted = _with_values(adapted, vals)
    small = ad.truncate(adapted)
    st = small["params"]["stacked"]["kernel"]
    np.testing.assert_array_equal(np.asarray(st.extra["default"]["e"]), [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    big = adapted["params"]["stacked"]["kernel"]
    np.testing.assert_array_equal(np.asarray(st.a["default"][0]), np.asarray(big.a["default"][0][:, [1, 3, 4]]))
    np.testing.assert_array_equal(np.asarray(st.b["default"][1][0]), np.asarray(big.b["default"][1][0]))
    assert st.meta["default"].rank == 3 and small["params"]["dense"]["kernel"].meta["default"].rank == 1
    assert small["params"]["heads"]["kernel"].meta["default"].rank == 5        # nothing masked: unchanged
    for p in SHAPES:
        np.testing.assert_allclose(np.asarray(small["params"][p]["kernel"].delta()),
                                   np.asarray(adapted["params"][p]["kernel"].delta()), rtol=1e-6, atol=1e-7)


def test_allocator_errors():
    spec = jlora.AdaLoRA(init_r=2, target_r=1, total_steps=10, targets=r".*kernel")
    lora = jlora.apply(_tree_params(), jlora.LoRA(rank=2, targets=r".*/dense/kernel"), key=0)
    with pytest.raises(ValueError, match="no AdaLoRA adapter named 'default'"):
        jlora.adalora_allocator(spec).init(jlora.partition(lora)[0])
    params = _tree_params()
    adapted = jlora.apply(params, jlora.AdaLoRA(init_r=2, target_r=1, total_steps=10, targets=r".*/dense/kernel"),
                          key=0, name="ada")
    trainable, frozen = jlora.partition(adapted)
    alloc = jlora.adalora_allocator(spec, name="ada")
    assert list(alloc.init(trainable).ipt) == ["params/dense/kernel"]
    step = jlora.train.make_step(lambda p, b, k: jnp.mean(b @ jlora.merge(p)["params"]["dense"]["kernel"]) ** 2,
                                 optax.sgd(0.1), adapter_update=alloc)
    with pytest.raises(TypeError, match="init_opt_state"):
        step(trainable, frozen, optax.sgd(0.1).init(trainable), jnp.ones((4, 12)))
    trainable, state, metrics = step(trainable, frozen, step.init(trainable), jnp.ones((4, 12)))
    assert int(state.step) == 1 and int(metrics["adalora_budget"]) == 2


def test_readme_adalora_section_runs(capsys):
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## AdaLoRA\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.split()[:2] == ["2", "2"]
