"""Adapter / merged / training-state checkpoints (jlora.io)."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import io as jio
from jlora.core.nodes import is_adapter_leaf
from jlora.core.paths import flatten_with_paths


class MLP(nn.Module):
    hidden: int = 64
    out: int = 32

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.out)(x)


X = jax.random.normal(jax.random.key(1), (5, 16))


def _params(hidden=64, seed=0):
    return MLP(hidden=hidden).init(jax.random.key(seed), X)


def _perturb(adapted, seed=3):
    """Non-zero B factors so that every adapter changes the forward."""
    def go(leaf):
        if isinstance(leaf, jlora.LoRANode):
            keys = jax.random.split(jax.random.key(seed), len(leaf.b))
            return leaf.with_(b={n: 0.1 * jax.random.normal(k, v.shape, v.dtype)
                                 for k, (n, v) in zip(keys, leaf.b.items())})
        return leaf
    return jax.tree_util.tree_map(go, adapted, is_leaf=is_adapter_leaf)


def _flat(tree):
    return dict(flatten_with_paths(tree, is_leaf=is_adapter_leaf)[0])


def _assert_same_adapted(x, y):
    fx, fy = _flat(x), _flat(y)
    assert fx.keys() == fy.keys()
    for p, a in fx.items():
        b = fy[p]
        assert type(a) is type(b), p
        if isinstance(a, jlora.LoRANode):
            assert (a.layout, a.adapters, a.active, a.path) == (b.layout, b.adapters, b.active, b.path)
            assert a.a.keys() == b.a.keys()
            for n in a.a:
                for u, v in ((a.a[n], b.a[n]), (a.b[n], b.b[n])):
                    assert u.dtype == v.dtype and np.array_equal(np.asarray(u), np.asarray(v)), (p, n)
            assert np.array_equal(np.asarray(a.base), np.asarray(b.base)), p
        elif isinstance(a, jlora.Trainable):
            assert np.array_equal(np.asarray(a.value), np.asarray(b.value)), p
        else:
            assert np.array_equal(np.asarray(a), np.asarray(b)), p
    assert jax.tree_util.tree_structure(x) == jax.tree_util.tree_structure(y)


def _forward(adapted):
    return np.asarray(jlora.lift(MLP().apply)(adapted, X))


def _dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


# ------------------------------------------------------------------------------------------
# adapters

def test_round_trip_factors_and_forward(tmp_path):
    params = _params()
    spec = jlora.LoRA(rank=4, alpha=8, targets=r".*/kernel", train_also=r"Dense_1/bias")
    adapted = _perturb(jlora.apply(params, spec, key=jax.random.key(0)))
    out = jio.save_adapter(tmp_path / "ad", adapted, spec=spec)
    assert out == str(tmp_path / "ad")

    loaded = jio.load_adapter(tmp_path / "ad", params)
    _assert_same_adapted(adapted, loaded)
    np.testing.assert_array_equal(_forward(adapted), _forward(loaded))

    meta = jio.read_adapter_metadata(tmp_path / "ad")
    assert meta["version"] == jio.FORMAT_VERSION
    assert meta["spec"]["rank"] == 4 and meta["spec"]["method"] == "lora"
    node = {n["path"]: n for n in meta["nodes"]}["params/Dense_0/kernel"]
    assert node["base_shape"] == [16, 64] and node["base_dtype"] == "float32"
    assert node["layout"] == {"stack": 0, "inputs": 1, "outputs": 1}
    assert node["adapters"][0]["rank"] == 4 and node["adapters"][0]["init"] == "kaiming"
    assert node["base_key"] is None
    assert [t["path"] for t in meta["trainables"]] == ["params/Dense_1/bias"]

    # Loading onto an already adapted tree uses its bases.
    fresh = jlora.apply(params, spec, key=jax.random.key(9))
    _assert_same_adapted(adapted, jio.load_adapter(tmp_path / "ad", fresh))


def test_multi_adapter_with_inactive_adapter(tmp_path):
    params = _params()
    adapted = jlora.apply(params, jlora.LoRA(rank=4, targets=r".*/kernel"), key=jax.random.key(0))
    adapted = jlora.apply(adapted, jlora.LoRA(rank=2, alpha=4, targets=r"Dense_1/kernel", dropout=0.1),
                          key=jax.random.key(1), name="other")
    adapted = jlora.activate(_perturb(adapted), ["default"])
    jio.save_adapter(tmp_path / "ad", adapted)
    loaded = jio.load_adapter(tmp_path / "ad", params)
    _assert_same_adapted(adapted, loaded)
    node = _flat(loaded)["params/Dense_1/kernel"]
    assert node.active == ("default",) and set(node.a) == {"default", "other"}
    assert node.meta["other"].dropout == 0.1
    for names in (["default"], ["other"], ["default", "other"]):
        np.testing.assert_array_equal(_forward(jlora.activate(adapted, names)),
                                      _forward(jlora.activate(loaded, names)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_round_trip(tmp_path, init):
    params = _params()
    adapted = jlora.apply(params, jlora.LoRA(rank=4, targets=r".*/kernel", init=init), key=jax.random.key(0))
    jio.save_adapter(tmp_path / "ad", adapted)
    meta = jio.read_adapter_metadata(tmp_path / "ad")
    assert all(n["base_key"] and n["adapters"][0]["init"] == init for n in meta["nodes"])
    loaded = jio.load_adapter(tmp_path / "ad", params)  # onto the original weights
    _assert_same_adapted(adapted, loaded)
    np.testing.assert_array_equal(_forward(adapted), _forward(loaded))
    np.testing.assert_allclose(_forward(loaded), MLP().apply(params, X), rtol=1e-4, atol=1e-4)


def test_size_on_disk_is_about_trainable_bytes(tmp_path):
    params = MLP(hidden=256, out=256).init(jax.random.key(0), X)
    adapted = jlora.apply(params, jlora.LoRA(rank=8, targets=r".*/kernel"), key=jax.random.key(0))
    adapted = _perturb(adapted)
    jio.save_adapter(tmp_path / "ad", adapted)
    trainable = jlora.count(adapted)["trainable_bytes"]
    size = _dir_bytes(tmp_path / "ad")
    assert size < 1.5 * trainable + 64 * 1024, (size, trainable)
    assert size < jlora.count(adapted)["frozen_bytes"] / 2


def test_wrong_shape_params(tmp_path):
    adapted = jlora.apply(_params(), jlora.LoRA(rank=4, targets=r".*/kernel"), key=jax.random.key(0))
    jio.save_adapter(tmp_path / "ad", adapted)
    with pytest.raises(jio.CheckpointError, match=r"params/Dense_0/kernel.*\(16, 64\).*\(16, 48\)"):
        jio.load_adapter(tmp_path / "ad", _params(hidden=48))
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), _params())
    with pytest.raises(jio.CheckpointError, match=r"float32.*bfloat16"):
        jio.load_adapter(tmp_path / "ad", bf16)


def test_wrong_path_and_not_a_checkpoint(tmp_path):
    params = _params()
    adapted = jlora.apply(params, jlora.LoRA(rank=4, targets=r".*/kernel"), key=jax.random.key(0))
    jio.save_adapter(tmp_path / "ad", adapted)
    renamed = {"params": {"Dense_0": params["params"]["Dense_0"], "Dense_9": params["params"]["Dense_1"]}}
    with pytest.raises(jio.CheckpointError, match=r"params/Dense_1/kernel.*not found.*Dense_9"):
        jio.load_adapter(tmp_path / "ad", renamed)

    os.makedirs(tmp_path / "empty")
    with pytest.raises(jio.CheckpointError, match="not a jlora adapter checkpoint"):
        jio.load_adapter(tmp_path / "empty", params)
    with pytest.raises(FileNotFoundError):
        jio.load_adapter(tmp_path / "nothing", params)
    jio.save_merged(tmp_path / "merged", adapted)
    with pytest.raises(jio.CheckpointError, match="plain Orbax checkpoint"):
        jio.load_adapter(tmp_path / "merged", params)

    meta_file = tmp_path / "ad" / jio.checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    meta["version"] = 999
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(jio.CheckpointError, match="unknown jlora adapter format version 999"):
        jio.load_adapter(tmp_path / "ad", params)


def test_save_needs_adapters(tmp_path):
    with pytest.raises(ValueError, match="no adapter nodes"):
        jio.save_adapter(tmp_path / "ad", _params())
    adapted = jlora.apply(_params(), jlora.LoRA(rank=4, targets=r".*/kernel"), key=jax.random.key(0))
    trainable, _ = jlora.partition(adapted)
    with pytest.raises(ValueError, match="full adapted tree"):
        jio.save_adapter(tmp_path / "ad", trainable)
    assert not os.path.exists(tmp_path / "ad")


class _BadSpec:
    def to_json(self):
        return {"method": "bad", "thing": object()}


def test_atomic_writes_and_overwrite(tmp_path):
    params = _params()
    spec = jlora.LoRA(rank=4, targets=r".*/kernel")
    first = _perturb(jlora.apply(params, spec, key=jax.random.key(0)), seed=1)
    second = _perturb(jlora.apply(params, spec, key=jax.random.key(5)), seed=2)
    path = tmp_path / "ad"
    jio.save_adapter(path, first, spec=spec)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        jio.save_adapter(path, second)
    # Fails after the arrays were written (JSON serialisation): the old checkpoint survives.
    with pytest.raises(TypeError):
        jio.save_adapter(path, second, spec=_BadSpec(), overwrite=True)
    _assert_same_adapted(first, jio.load_adapter(path, params))
    assert sorted(os.listdir(tmp_path)) == ["ad"], "temporary directories left behind"

    jio.save_adapter(path, second, spec=spec, overwrite=True)
    _assert_same_adapted(second, jio.load_adapter(path, params))
    assert sorted(os.listdir(tmp_path)) == ["ad"]

    jio.save_merged(tmp_path / "m", first)
    with pytest.raises(FileExistsError):
        jio.save_merged(tmp_path / "m", second)
    jio.save_merged(tmp_path / "m", second, overwrite=True)


def test_nnx_state_round_trip(tmp_path):
    from flax import nnx
    model = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    adapted = _perturb(jlora.apply(state, jlora.LoRA(rank=2, targets="kernel"), key=jax.random.key(0)))
    jio.save_adapter(tmp_path / "ad", adapted)
    loaded = jio.load_adapter(tmp_path / "ad", nnx.state(nnx.Linear(16, 8, rngs=nnx.Rngs(0)), nnx.Param))
    _assert_same_adapted(adapted, loaded)


# ------------------------------------------------------------------------------------------
# merged

def test_merged_restores_with_plain_orbax(tmp_path):
    params = _params()
    adapted = _perturb(jlora.apply(params, jlora.LoRA(rank=4, targets=r".*/kernel"), key=jax.random.key(0)))
    jio.save_merged(tmp_path / "merged", adapted)
    merged = jlora.merge(adapted)
    expected = {p: np.asarray(v) for p, v in flatten_with_paths(merged)[0]}
    np.savez(tmp_path / "expected.npz", **{p.replace("/", "."): v for p, v in expected.items()})
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import orbax.checkpoint as ocp
        restored = ocp.StandardCheckpointer().restore({str(tmp_path / 'merged')!r})
        expected = np.load({str(tmp_path / 'expected.npz')!r})
        flat = {{}}
        def walk(prefix, node):
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(prefix + [k], v)
            else:
                flat[".".join(prefix)] = np.asarray(node)
        walk([], restored)
        assert sorted(flat) == sorted(expected.files), (sorted(flat), expected.files)
        for k in expected.files:
            assert flat[k].dtype == expected[k].dtype and np.array_equal(flat[k], expected[k]), k
        assert not any(m == "jlora" or m.startswith("jlora.") for m in sys.modules)
        print("OK")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=str(tmp_path), timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------
# training state

def test_resume_is_bit_for_bit(tmp_path):
    model = MLP()
    params = _params()
    spec = jlora.LoRA(rank=4, alpha=8, targets=r".*/kernel", dropout=0.1, train_also=r"Dense_1/bias")
    opt = optax.adam(1e-2)
    lifted = jlora.lift(model.apply)
    y_true = jnp.sin(jnp.arange(5 * 32, dtype=jnp.float32).reshape(5, 32))

    @jax.jit
    def train_step(trainable, opt_state, frozen, rng, i):
        rng, sub = jax.random.split(rng)
        x = jax.random.normal(jax.random.fold_in(jax.random.key(7), i), (5, 16))

        def loss(t):
            return jnp.mean((lifted(jlora.combine(t, frozen), x, jlora_rng=sub) - y_true) ** 2)

        grads = jax.grad(loss)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, rng

    def fresh(seed):
        trainable, frozen = jlora.partition(jlora.apply(params, spec, key=jax.random.key(seed)))
        return trainable, opt.init(trainable), frozen

    trainable, opt_state, frozen = fresh(0)
    rng = jax.random.key(42)
    t_ref, o_ref, r_ref = trainable, opt_state, rng
    for i in range(6):
        t_ref, o_ref, r_ref = train_step(t_ref, o_ref, frozen, r_ref, i)

    t, o, r = trainable, opt_state, rng
    for i in range(3):
        t, o, r = train_step(t, o, frozen, r, i)
    manager = jio.checkpoint_manager(tmp_path / "train", max_to_keep=2)
    assert jio.save_state(manager, 3, t, o, r)
    t_after_3, o_after_3, rng_after_3 = t, o, r
    manager.close()

    manager = jio.checkpoint_manager(tmp_path / "train", max_to_keep=2)
    t_tmpl, o_tmpl, _ = fresh(123)  # different values, same structure
    step, t, o, r = jio.restore_state(manager, t_tmpl, o_tmpl, jax.random.key(0))
    assert step == 3
    for i in range(3, 6):
        t, o, r = train_step(t, o, frozen, r, i)

    for u, v in zip(jax.tree_util.tree_leaves((t_ref, o_ref)), jax.tree_util.tree_leaves((t, o))):
        assert u.dtype == v.dtype and np.array_equal(np.asarray(u), np.asarray(v))
    assert jax.tree_util.tree_structure((t_ref, o_ref)) == jax.tree_util.tree_structure((t, o))
    assert np.array_equal(jax.random.key_data(r_ref), jax.random.key_data(r))

    # Abstract templates (jax.eval_shape) work too.
    abstract = jax.eval_shape(lambda: (t_tmpl, o_tmpl, jax.random.key(0)))
    _, t2, o2, r2 = jio.restore_state(manager, *abstract, step=3)
    assert np.array_equal(jax.random.key_data(r2), jax.random.key_data(rng_after_3))
    for u, v in zip(jax.tree_util.tree_leaves((t2, o2)), jax.tree_util.tree_leaves((t_after_3, o_after_3))):
        assert np.array_equal(np.asarray(u), np.asarray(v))

    # A template that does not fit gives a clear error.
    wrong, _ = jlora.partition(jlora.apply(params, jlora.LoRA(rank=2, targets=r".*/kernel",
                                                                   train_also=r"Dense_1/bias"),
                                                        key=jax.random.key(0)))
    with pytest.raises(jio.CheckpointError, match=r"trainable.*Dense_0/kernel/a/default.*\(16, 4\).*\(16, 2\)"):
        jio.restore_state(manager, wrong, opt.init(wrong), jax.random.key(0))
    with pytest.raises(jio.CheckpointError, match=r"checkpoint leaves not in the template.*Dense_1/bias/value"):
        jio.restore_state(manager, *jlora.partition(jlora.apply(params, jlora.LoRA(rank=4, targets=r".*/kernel"),
                                                                key=jax.random.key(0)))[:1],
                          o_tmpl, jax.random.key(0))

    # Older steps are pruned, rng may be omitted.
    for s in (4, 5, 6):
        jio.save_state(manager, s, t, o, None)
    step, _, _, rng_none = jio.restore_state(manager, t_tmpl, o_tmpl)
    assert step == 6 and rng_none is None and list(manager.all_steps()) == [5, 6]
    manager.close()


# ------------------------------------------------------------------------------------------
# non-finite values are never written

def _lora(train_also=r"Dense_1/bias"):
    return _perturb(jlora.apply(_params(), jlora.LoRA(rank=4, targets=r".*/kernel", train_also=train_also),
                                key=jax.random.key(0)))


def _poisoned(train_also=r"Dense_1/bias"):
    def go(leaf):
        if isinstance(leaf, jlora.LoRANode) and leaf.path.endswith("Dense_0/kernel"):
            return leaf.with_(b={n: v.at[0, 1].set(jnp.nan) for n, v in leaf.b.items()})
        return leaf
    return jax.tree_util.tree_map(go, _lora(train_also), is_leaf=is_adapter_leaf)


def test_no_save_path_writes_a_nonfinite_value(tmp_path):
    bad = _poisoned()
    with pytest.raises(jio.NonFiniteError, match=r"save_adapter.*Dense_0/kernel/b/default"):
        jio.save_adapter(tmp_path / "adapter", bad)
    with pytest.raises(jio.NonFiniteError, match=r"save_merged.*Dense_0/kernel"):
        jio.save_merged(tmp_path / "merged", bad)
    with pytest.raises(jio.NonFiniteError, match=r"save_peft.*Dense_0.lora_B"):
        jio.save_peft(tmp_path / "peft", _poisoned(train_also=None), jio.default_naming, task_type=None)
    trainable, _ = jlora.partition(bad)
    opt = optax.adam(1e-3)
    manager = jio.checkpoint_manager(tmp_path / "train")
    with pytest.raises(jio.NonFiniteError, match=r"save_state step 5 trainable.*Dense_0/kernel/b/default"):
        jio.save_state(manager, 5, trainable, opt.init(trainable), jax.random.key(0))
    good_t = jlora.partition(_lora())[0]
    inf_moments = jax.tree_util.tree_map(lambda v: jnp.full_like(v, jnp.inf) if v.dtype == jnp.float32 else v,
                                         opt.init(good_t))
    with pytest.raises(jio.NonFiniteError, match=r"save_state step 6 opt_state"):
        jio.save_state(manager, 6, good_t, inf_moments, jax.random.key(0))
    manager.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"] and manager.all_steps() == []
    # integer, boolean and key leaves pass; a finite tree passes
    jio.check_finite({"i": jnp.arange(3), "m": jnp.ones(2, bool), "k": jax.random.key(1), "x": np.ones(2)}, "ok")


# ------------------------------------------------------------------------------------------
# damaged files are refused, never loaded silently

def _data_files(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return sorted((f for f in files if os.path.getsize(f) > 0 and not f.endswith((".json", "_METADATA"))),
                  key=os.path.getsize)


def _flip(path, n=64):
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    for i in range(mid, min(mid + n, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_adapter_arrays_raise_naming_the_checkpoint(tmp_path, damage):
    adapted = _lora()
    path = jio.save_adapter(tmp_path / "ad", adapted)
    assert set(jio.read_adapter_metadata(path)["sha256"]) >= {"params/Dense_0/kernel/a/default"}
    target = _data_files(os.path.join(path, "arrays"))[-1]
    if damage == "flip":
        _flip(target)
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
    with pytest.raises(jio.CorruptCheckpointError, match=r"adapter checkpoint .*ad.*(damaged|truncated)"):
        jio.load_adapter(path, _params())


def test_flipped_values_that_still_decode_are_caught_by_the_digest(tmp_path, monkeypatch):
    path = jio.save_adapter(tmp_path / "ad", _lora())
    real_restore = jio.checkpoint.ocp.Checkpointer.restore

    def bit_rot(self, directory, *args, **kwargs):  # the storage returns a value one bit off
        out = real_restore(self, directory, *args, **kwargs)
        key = "params/Dense_1/kernel/b/default"
        out[key] = out[key].at[0, 0].set(jnp.nextafter(out[key][0, 0], jnp.inf))
        return out

    monkeypatch.setattr(jio.checkpoint.ocp.Checkpointer, "restore", bit_rot)
    with pytest.raises(jio.CorruptCheckpointError, match=r"differ from the sha256.*Dense_1/kernel/b/default"):
        jio.load_adapter(path, _params())


@pytest.mark.parametrize("edit", ["scale", "active", "dtype"])
def test_edited_adapter_metadata_is_refused(tmp_path, edit):
    path = jio.save_adapter(tmp_path / "ad", _lora())
    meta_file = os.path.join(path, jio.checkpoint.META_FILE)
    meta = json.load(open(meta_file))
    node = meta["nodes"][0]
    if edit == "scale":
        node["adapters"][0]["scale"] *= 2
    elif edit == "active":
        node["active"] = []
    else:
        node["adapters"][0]["a"]["dtype"] = "bfloat16"
    json.dump(meta, open(meta_file, "w"), indent=1)
    with pytest.raises(jio.CorruptCheckpointError, match="jlora_adapter.json does not match the digest.*edited"):
        jio.load_adapter(path, _params())


@pytest.mark.parametrize("part", ["trainable", "jlora", "all"])
def test_damaged_newest_training_state_falls_back_to_the_previous(tmp_path, part):
    trainable, _ = jlora.partition(_lora())
    opt = optax.adam(1e-3)
    manager = jio.checkpoint_manager(tmp_path / "train", max_to_keep=3)
    states = {}
    for s in (10, 20):
        trainable = jax.tree_util.tree_map(lambda v: v + 0.5, trainable)
        states[s] = _snapshot_leaves(trainable)
        jio.save_state(manager, s, trainable, opt.init(trainable), jax.random.key(s), wait=True)
    manager.close()
    step_dir = tmp_path / "train" / "20"
    for f in _data_files(step_dir if part == "all" else step_dir / part):
        _flip(f)
    manager = jio.checkpoint_manager(tmp_path / "train", max_to_keep=3)
    template = (trainable, opt.init(trainable), jax.random.key(0))
    with pytest.warns(RuntimeWarning, match=r"(?s)restored step 10 .*newer checkpoints are damaged.*step 20"):
        step, t, _, rng = jio.restore_state(manager, *template)
    assert step == 10 and all(np.array_equal(u, v) for u, v in zip(_snapshot_leaves(t), states[10]))
    assert np.array_equal(jax.random.key_data(rng), jax.random.key_data(jax.random.key(10)))
    with pytest.raises(jio.CorruptCheckpointError, match="step 20"):
        jio.restore_state(manager, *template, step=20)
    manager.close()


def _snapshot_leaves(tree):
    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]
