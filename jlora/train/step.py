"""A jitted training step for adapted models: gradients w.r.t. the trainable half only,
optax update, buffer donation, gradient accumulation and (optionally) mesh sharding.

Example::

    import jax, optax, jlora
    from jlora.train import make_step, init_opt_state

    adapted = jlora.apply(params, jlora.LoRA(rank=4, targets=r".*kernel"), key=jax.random.key(0))
    trainable, frozen = jlora.partition(adapted)
    forward = jlora.lift(model.apply)

    def loss_fn(params, batch, key):
        pred = forward({"params": params}, batch["x"])
        return jnp.mean((pred - batch["y"]) ** 2)

    optimizer = optax.adam(1e-3)
    step = make_step(loss_fn, optimizer, accum_steps=2)
    opt_state = init_opt_state(optimizer, trainable)
    for batch in batches:
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, key)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jlora.core.api import combine
from jlora.core.nodes import is_adapter_leaf, is_node
from jlora.core.paths import flatten_with_paths
from jlora.distributed import runtime, sharding as shd
from jax.sharding import Mesh

__all__ = ["make_step", "init_opt_state", "StepState"]

_RESERVED = ("loss", "grad_norm", "skipped")


class StepState(NamedTuple):
    """What a step built with ``make_step(..., adapter_update=u)`` carries in place of the bare
    optimizer state (a pytree: it donates, shards and checkpoints like one).

    ``opt_state``: the optimizer's state; ``adapter_state``: ``u.init(trainable)``, updated by
    ``u.update`` every step; ``step``: int32 count of the steps taken so far (the ``step`` that
    ``u.update`` receives: 0 on the first call).
    """

    opt_state: Any
    adapter_state: Any
    step: Any


def _check_adapter_update(u):
    if u is None:
        return
    missing = [m for m in ("init", "update") if not callable(getattr(u, m, None))]
    if missing:
        raise TypeError(f"adapter_update must have init(trainable) and update(state, trainable, grads, step) -> "
                        f"(trainable, state, metrics) methods (e.g. jlora.adalora_allocator(spec)); "
                        f"{type(u).__name__} lacks {missing}")
    loss = getattr(u, "loss", None)
    if loss is not None and not callable(loss):
        raise TypeError(f"adapter_update.loss must be a callable loss(trainable) -> scalar, got {loss!r}")


# ------------------------------------------------------------------------------------------
# boundary checks

def _check_halves(trainable, frozen):
    """Catches the usual mix-ups: the whole adapted tree (or the frozen half) passed as
    ``trainable``, nothing to train, or the halves swapped. Plain arrays in ``trainable`` are
    allowed (they are trained in full)."""
    t_flat, _ = flatten_with_paths(trainable, is_leaf=is_adapter_leaf)
    n_arrays = 0
    for path, leaf in t_flat:
        if is_node(leaf):
            if leaf.base is not None:
                raise ValueError(
                    f"trainable holds the frozen base weight of {path!r}; pass the two halves of "
                    f"`trainable, frozen = jlora.partition(adapted)`, not the adapted tree itself")
            n_arrays += sum(v is not None for st in leaf.states.values() for v in st.arrays().values())
        else:  # a Trainable (train_also) leaf, or a plain array the caller chose to train in full
            n_arrays += 1
    if n_arrays == 0:
        raise ValueError("trainable holds no arrays, so there is nothing to train; pass the first half of "
                         "`jlora.partition(adapted)` (are any adapters active? see jlora.activate)")
    f_flat, _ = flatten_with_paths(frozen, is_leaf=is_adapter_leaf)
    for path, leaf in f_flat:
        if is_node(leaf) and any(v is not None for n in leaf.active
                                 for k, v in leaf.states[n].arrays().items() if k not in leaf.states[n].frozen):
            raise ValueError(f"frozen holds the active adapter factors of {path!r}; pass "
                             f"`trainable, frozen = jlora.partition(adapted)` in that order")


def _check_batch(batch, accum_steps: int):
    flat, _ = flatten_with_paths(batch)
    if not flat:
        raise ValueError("batch holds no arrays")
    if accum_steps == 1:
        return
    for path, x in flat:
        shape = np.shape(x)
        name = path or "<batch>"
        if len(shape) == 0:
            raise ValueError(f"accum_steps={accum_steps} splits every batch leaf along its leading dim, but "
                             f"{name!r} is a scalar; pass per-example arrays only")
        if shape[0] % accum_steps:
            raise ValueError(f"batch leaf {name!r} has leading dim {shape[0]} (shape {tuple(shape)}), which is not "
                             f"divisible by accum_steps={accum_steps}")


def _split_output(out):
    if isinstance(out, tuple):
        if len(out) != 2:
            raise TypeError(f"loss_fn must return a scalar loss or (loss, aux_dict); got a tuple of {len(out)} items")
        loss, aux = out
    else:
        loss, aux = out, {}
    if not hasattr(loss, "shape"):
        loss = jnp.asarray(loss)
    if tuple(loss.shape) != ():
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}; reduce it "
                         f"(e.g. jnp.mean) inside loss_fn")
    if not jnp.issubdtype(loss.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return a floating loss, got dtype {loss.dtype}")
    if aux is None:
        aux = {}
    if not isinstance(aux, Mapping):
        raise TypeError(f"loss_fn's aux output must be a dict of metrics, got {type(aux).__name__}")
    clash = [k for k in aux if k in _RESERVED]
    if clash:
        raise ValueError(f"loss_fn's aux uses reserved metric name {clash[0]!r} (reserved: {_RESERVED})")
    return loss, dict(aux)


# ------------------------------------------------------------------------------------------
# the step

def _global_norm(tree):
    """``optax.global_norm`` (``optax.tree.norm`` in newer optax, where the former is deprecated)."""
    tree_ns = getattr(optax, "tree", None)
    if tree_ns is not None and hasattr(tree_ns, "norm"):
        return tree_ns.norm(tree)
    return optax.global_norm(tree)


def _acc_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.inexact) else jnp.float32


def make_step(loss_fn: Callable, optimizer: optax.GradientTransformation, *, accum_steps: int = 1,
              mesh=None, rules=None, batch_axes=("data",), donate: bool = True, adapter_update=None,
              skip_nonfinite: bool = True):
    """Builds ``step(trainable, frozen, opt_state, batch, key=None) -> (trainable, opt_state, metrics)``.

    ``loss_fn(params, batch, key)`` gets ``params = jlora.combine(trainable, frozen)`` (lift the
    model inside it) and returns a scalar loss or ``(loss, aux_dict)``. Gradients are taken
    w.r.t. ``trainable`` only and applied with ``optimizer``; ``frozen`` is never written.
    ``metrics`` holds ``"loss"``, ``"grad_norm"`` (``optax.global_norm`` of the averaged gradients, before
    the optimizer), ``"skipped"`` (int32: 1 when this step's update was skipped; only with ``skip_nonfinite``)
    and the aux entries.

    Args:
      loss_fn: ``(params, batch, key) -> loss`` or ``(loss, aux)``.
      optimizer: an ``optax.GradientTransformation``.
      accum_steps: split every batch leaf's leading dim into this many micro-batches, run them
        one after another under ``lax.scan`` and average the gradients, loss and aux (the same
        update as one step on the whole batch when the loss is a mean over examples). Micro-batch
        ``j`` holds examples ``j, j + accum_steps, j + 2 * accum_steps, ...`` so that each
        data-parallel shard contributes to every micro-batch. Each micro-batch gets the key
        ``jax.random.fold_in(key, j)``.
      mesh, rules: when given, the step is jitted with ``in_shardings`` / ``out_shardings`` from
        :func:`jlora.distributed.shardings_for` (parameters, optimizer state) and the batch is split
        along ``batch_axes`` on its leading dim; inputs are placed with ``jax.device_put`` first
        (a no-op when they already have those shardings). Without ``rules`` everything but the
        batch is replicated (plain data parallelism).
      batch_axes: mesh axes the batch's leading dim is split over, e.g. ``("data", "fsdp")``.
      donate: donate the ``trainable`` and ``opt_state`` buffers (don't reuse the arrays passed in).
      adapter_update: a method's own per-step update that runs inside the jitted step, with its
        state carried by the step (e.g. AdaLoRA's rank allocator, ``jlora.adalora_allocator(spec)``).
        Any object with
          ``init(trainable) -> state``,
          ``update(state, trainable, grads, step) -> (trainable, state, metrics)`` (pure; called
          after the optimizer with the updated ``trainable``, the averaged gradients it used and
          the int32 count of earlier steps; ``metrics`` is a dict of scalars merged into the
          step's), and optionally
          ``loss(trainable) -> scalar``, added to ``loss_fn``'s loss before differentiation (so
          ``metrics["loss"]`` includes it, as PEFT's AdaLoRA loss does) and reported alone as
          ``metrics["adapter_loss"]``.
        The step's ``opt_state`` is then a :class:`StepState` ``(opt_state, adapter_state, step)``:
        create it with ``init_opt_state(optimizer, trainable, adapter_update=...)`` or
        ``step.init(trainable)``. Without ``adapter_update`` nothing changes.
      skip_nonfinite: when the loss or the gradients' global norm is not finite (one bad batch, an
        overflow), return ``trainable`` and ``opt_state`` (and the adapter state and step count)
        unchanged instead of applying an update that would poison them for good, and report
        ``metrics["skipped"] = 1``. The decision is made inside the jitted step (no host sync);
        :func:`jlora.train.fit` counts the skips and stops a run that keeps skipping. ``False``
        applies every update, as a bare optax loop does.

    Example::

        step = make_step(loss_fn, optax.adamw(1e-3), accum_steps=4,
                         mesh=make_mesh((2, 4), ("data", "fsdp")),
                         rules=[(r"kernel$", P("fsdp", None))], batch_axes=("data", "fsdp"))
        trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch, key)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (with init/update), got {optimizer!r}")
    if not isinstance(accum_steps, int) or isinstance(accum_steps, bool) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
    if rules is not None and mesh is None:
        raise ValueError("rules= needs a mesh=; pass mesh=jlora.distributed.make_mesh(...)")
    _check_adapter_update(adapter_update)
    extra_loss = getattr(adapter_update, "loss", None)
    if mesh is not None:
        if not isinstance(mesh, Mesh):
            raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        batch_axes = shd._batch_axes(mesh, batch_axes)
        rules = shd.normalize_rules(rules)
    donate_argnums = (0, 2) if donate else ()

    def loss_and_grads(trainable, frozen, batch, key):
        def wrapped(t):
            try:
                params = combine(t, frozen)
            except (ValueError, TypeError) as e:
                raise ValueError(f"trainable and frozen do not fit together ({e}); pass the two halves of "
                                 f"the same `jlora.partition(adapted)`") from e
            loss, aux = _split_output(loss_fn(params, batch, key))
            if extra_loss is not None:
                if "adapter_loss" in aux:
                    raise ValueError("loss_fn's aux uses 'adapter_loss', which a step with adapter_update.loss reserves")
                add = jnp.asarray(extra_loss(t))
                if add.shape != ():
                    raise ValueError(f"adapter_update.loss must return a scalar, got shape {add.shape}")
                aux = {**aux, "adapter_loss": add.astype(jnp.float32)}
                loss = loss + add.astype(loss.dtype)
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(wrapped, has_aux=True)(trainable)
        return loss, aux, grads

    def micro_constraint(x):
        if mesh is None or not batch_axes or x.ndim < 2:
            return x
        size = math.prod(mesh.shape[a] for a in batch_axes)
        if x.shape[1] % size:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.batch_entry(batch_axes))))

    def accumulate(trainable, frozen, batch, key):
        k = accum_steps

        def split(x):
            x = jnp.asarray(x)
            x = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
            return micro_constraint(x)

        micro = jax.tree_util.tree_map(split, batch)
        keys = None if key is None else jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(k))
        first = jax.tree_util.tree_map(lambda x: x[0], (micro, keys))
        loss_s, aux_s, grads_s = jax.eval_shape(lambda mb, kk: loss_and_grads(trainable, frozen, mb, kk), *first)
        zeros = lambda s: jnp.zeros(s.shape, _acc_dtype(s.dtype))
        carry0 = (jax.tree_util.tree_map(zeros, (loss_s, aux_s, grads_s)))

        def body(carry, xs):
            mb, kk = xs
            out = loss_and_grads(trainable, frozen, mb, kk)
            return jax.tree_util.tree_map(lambda c, v: c + v.astype(c.dtype), carry, out), None

        (loss, aux, grads), _ = jax.lax.scan(body, carry0, (micro, keys))
        loss = loss / k
        aux = jax.tree_util.tree_map(lambda v: v / k, aux)
        grads = jax.tree_util.tree_map(lambda g, s: (g / k).astype(s.dtype), grads, grads_s)
        return loss, aux, grads

    def _step(trainable, frozen, opt_state, batch, key):
        if mesh is None:
            return _update(trainable, frozen, opt_state, batch, key)
        with shd.activation_sharding(mesh, batch_axes):   # models' constrain_batch hooks see the mesh
            return _update(trainable, frozen, opt_state, batch, key)

    def _update(trainable, frozen, opt_state, batch, key):
        old_trainable, old_state = trainable, opt_state
        if adapter_update is not None:
            opt_state, adapter_state, count = opt_state
        if accum_steps == 1:
            loss, aux, grads = loss_and_grads(trainable, frozen, batch, key)
        else:
            loss, aux, grads = accumulate(trainable, frozen, batch, key)
        grad_norm = _global_norm(grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        metrics = {"loss": loss.astype(jnp.float32), "grad_norm": grad_norm,
                   **({"skipped": (~finite).astype(jnp.int32)} if skip_nonfinite else {}), **aux}
        if adapter_update is not None:
            trainable, adapter_state, more = adapter_update.update(adapter_state, trainable, grads, count)
            clash = sorted(set(more or {}) & set(metrics))
            if clash:
                raise ValueError(f"adapter_update's metrics {clash} clash with the step's or loss_fn's metrics")
            metrics.update(more or {})
            opt_state = StepState(opt_state, adapter_state, count + 1)
        if skip_nonfinite:  # a select, not a branch: same program, no host sync, donation still applies
            keep = lambda new, old: jnp.where(finite, new, old)
            trainable = jax.tree_util.tree_map(keep, trainable, old_trainable)
            opt_state = jax.tree_util.tree_map(keep, opt_state, old_state)
        return trainable, opt_state, metrics

    jitted = jax.jit(_step, donate_argnums=donate_argnums) if mesh is None else None
    checked: set = set()
    sharded: dict = {}

    def _shardings(trainable, frozen, opt_state, batch):
        t_sh = shd.shardings_for(trainable, mesh, rules)
        f_sh = shd.shardings_for(frozen, mesh, rules)
        o_sh = shd.opt_state_shardings(opt_state, trainable, t_sh, mesh)
        b_sh = shd.batch_shardings(batch, mesh, batch_axes)
        return t_sh, f_sh, o_sh, b_sh

    def _prepare(trainable, frozen, opt_state, batch, key):
        if isinstance(key, int) and not isinstance(key, bool):
            key = jax.random.key(key)
        abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(batch))
        if mesh is not None and jax.process_count() > 1 and not abstract:   # each process passes its own rows
            batch = runtime.global_batch(batch, mesh, batch_axes)
        sig = jax.tree_util.tree_structure((trainable, frozen, batch))
        shapes = tuple(np.shape(x) for x in jax.tree_util.tree_leaves(batch))
        if (sig, shapes) not in checked:
            _check_halves(trainable, frozen)
            _check_batch(batch, accum_steps)
            checked.add((sig, shapes))
        _check_state(opt_state)
        return trainable, frozen, opt_state, batch, key

    def _sharded(args):
        """The jitted step and its input shardings for these argument shapes (built once per shape)."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        cache_key = (treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves))
        entry = sharded.get(cache_key)
        if entry is None:
            trainable, frozen, opt_state, batch, key = args
            t_sh, f_sh, o_sh, b_sh = _shardings(trainable, frozen, opt_state, batch)
            rep = shd.replicated(mesh)
            in_sh = (t_sh, f_sh, o_sh, b_sh, None if key is None else rep)
            fn = jax.jit(_step, in_shardings=in_sh, out_shardings=(t_sh, o_sh, rep),
                         donate_argnums=donate_argnums)
            entry = sharded[cache_key] = (fn, in_sh)
        return entry

    def step(trainable, frozen, opt_state, batch, key=None):
        args = _prepare(trainable, frozen, opt_state, batch, key)
        if mesh is None:
            return jitted(*args)
        fn, in_sh = _sharded(args)
        return fn(*shd.place(args, in_sh))

    def lower(trainable, frozen, opt_state, batch, key=None):
        """The step lowered for these inputs (arrays or ``jax.ShapeDtypeStruct`` s: nothing needs to be
        materialised, and with a mesh the batch's shapes are global), as ``jax.jit(...).lower`` gives:
        ``.as_text()`` is the StableHLO, ``.compile()`` the executable."""
        args = _prepare(trainable, frozen, opt_state, batch, key)
        if mesh is None:
            return jitted.lower(*args)
        return _sharded(args)[0].lower(*args)

    def memory(trainable, frozen, opt_state, batch, key=None) -> dict:
        """The compiler's memory analysis of the step for these inputs, in bytes per device:
        ``argument``, ``output``, ``alias`` (outputs written over donated inputs), ``temp``
        (activations and scratch), ``generated_code``, and ``peak`` = argument + output - alias +
        temp (what one device holds while the step runs, the compiler's accounting)."""
        stats = lower(trainable, frozen, opt_state, batch, key).compile().memory_analysis()
        if stats is None:   # pragma: no cover - a backend without memory analysis
            raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis for a compiled program")
        out = {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
               "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes),
               "generated_code": int(stats.generated_code_size_in_bytes)}
        out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
        return out

    def _check_state(opt_state):
        if adapter_update is not None and not isinstance(opt_state, StepState):
            raise TypeError(f"this step was built with adapter_update={type(adapter_update).__name__}, so it carries a "
                            f"jlora.train.StepState; create opt_state with jlora.train.init_opt_state(optimizer, "
                            f"trainable, adapter_update=...) or step.init(trainable), not optimizer.init")
        if adapter_update is None and isinstance(opt_state, StepState):
            raise TypeError("opt_state is a StepState (made for a step with adapter_update=...), but this step was "
                            "built without adapter_update; pass the same adapter_update to make_step")

    def init(trainable):
        """The ``opt_state`` this step expects (with ``adapter_update``: a :class:`StepState`)."""
        return init_opt_state(optimizer, trainable, mesh=mesh, rules=rules, adapter_update=adapter_update)

    step.init = init
    step.lower = lower
    step.memory = memory
    step.log_metrics = (tuple(getattr(adapter_update, "metric_names", ())) +
                        (("adapter_loss",) if extra_loss is not None else ()))
    step.jitted = jitted
    step.shardings = _shardings if mesh is not None else None
    step.__doc__ = ("step(trainable, frozen, opt_state, batch, key=None) -> (trainable, opt_state, metrics); "
                    "built by jlora.train.make_step.")
    return step


def init_opt_state(optimizer: optax.GradientTransformation, trainable, *, mesh=None, rules=None,
                   adapter_update=None):
    """``optimizer.init(trainable)``; with ``mesh`` (and ``rules``) the state is created already
    sharded like the step expects (moments follow the trainable leaves, counters replicated).
    With ``adapter_update`` (see :func:`make_step`): ``StepState(optimizer.init(trainable),
    adapter_update.init(trainable), 0)``.

    Example::

        opt_state = init_opt_state(optax.adam(1e-3), trainable)
    """
    if adapter_update is not None:
        _check_adapter_update(adapter_update)
        inner = init_opt_state(optimizer, trainable, mesh=mesh, rules=rules)
        return StepState(inner, adapter_update.init(trainable), jnp.zeros((), jnp.int32))
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (with init/update), got {optimizer!r}")
    t_flat, _ = flatten_with_paths(trainable, is_leaf=is_adapter_leaf)
    for path, leaf in t_flat:
        if is_node(leaf) and leaf.base is not None:
            raise ValueError(f"trainable holds the frozen base weight of {path!r}; pass the first half of "
                             f"`jlora.partition(adapted)`, not the adapted tree itself")
    if mesh is None:
        return optimizer.init(trainable)
    t_sh = shd.shardings_for(trainable, mesh, rules)
    abstract = jax.eval_shape(optimizer.init, trainable)
    o_sh = shd.opt_state_shardings(abstract, trainable, t_sh, mesh)
    return jax.jit(optimizer.init, in_shardings=(t_sh,), out_shardings=o_sh)(shd.place(trainable, t_sh))
