"""Orbax checkpoints for adapters, merged weights and training state. No pickle anywhere.

Three kinds of checkpoint:

* **Adapter** (:func:`save_adapter` / :func:`load_adapter`): only what was trained. A directory
  holding ``jlora_adapter.json`` (format version, per-node metadata, the spec) and ``arrays/``,
  an Orbax checkpoint of a flat dict keyed by ``'/'``-joined leaf paths::

      params/Dense_0/kernel/a/default     factor A of adapter "default"
      params/Dense_0/kernel/b/default     factor B
      params/Dense_0/kernel/base          residual base (PiSSA / OLoRA nodes only, see below)
      params/head/kernel/value            a ``Trainable`` (train_also) leaf

  Every named adapter on a node is saved, active or not. Its size on disk is about the
  trainable bytes. PiSSA and OLoRA initialisation rewrite the base into a residual
  (``W - s * A0 @ B0``); for nodes carrying such an adapter the residual base is saved too, so
  loading onto the *original* weights reproduces the same forward (these checkpoints are
  therefore as large as the adapted kernels).

* **Merged** (:func:`save_merged`): ``jlora.merge(adapted)`` as a plain nested dict written by
  Orbax's ``StandardCheckpointHandler``; ``ocp.StandardCheckpointer().restore(path)`` reads it
  back without jlora.

* **Training state** (:func:`checkpoint_manager`, :func:`save_state`, :func:`restore_state`):
  trainable tree, optimizer state and PRNG key(s) per step in an ``ocp.CheckpointManager``;
  resuming is bit-for-bit, onto another mesh or another number of processes too (the templates'
  shardings decide the layout). Remote directories (``gs://...``) go to Orbax as they are.

**Many processes** (``jax.distributed``): every process calls the same save with the same tree
(global arrays, or host values that are equal on every process); the directory must be one that
all processes see (a bucket, NFS). Orbax writes each array shard from the process that holds it;
process 0 writes the JSON and the PEFT files and renames the finished directory into place
after a barrier, so there is one writer for each single file and a killed run leaves the previous
checkpoint intact.

:func:`save_adapter` and :func:`save_merged` write into a temporary sibling directory and rename
it into place, so a save that fails midway leaves an existing checkpoint at ``path`` untouched;
they refuse to replace an existing ``path`` unless ``overwrite=True``. They target a local (or
locally mounted) filesystem, shared by all processes in a multi-process run.

Nothing non-finite is written (every save checks its floating arrays, :class:`NonFiniteError`), and
nothing damaged is read: each array's sha256 is recorded at save and compared at load, the adapter
metadata carries a digest of itself, and damaged, truncated or edited files raise
:class:`CorruptCheckpointError`; :func:`restore_state` falls back to the newest undamaged step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax.core import unfreeze

from jlora.core.api import merge as _merge, reserved_keys, saved_entries, with_entry
from jlora.core.errors import CheckpointError, CorruptCheckpointError, NonFiniteError
from jlora.core.nodes import AdapterMeta, Layout, AdaptedWeight, Trainable, is_adapter_leaf
from jlora.core.paths import flatten_with_paths, key_to_str, near_misses
from jlora.core.state import rewrites_base
from jlora._version import __version__
from jlora.distributed.runtime import barrier, is_main_process, to_host
from jlora.distributed.sharding import factor_specs
from jax.experimental import multihost_utils
import warnings

FORMAT = "jlora.adapter"
FORMAT_VERSION = 3          # 2: per-adapter "extra" / "cache" arrays (DoRA, AdaLoRA, IA3); 3: sha256 digests
SUPPORTED_VERSIONS = (1, 2, 3)
META_FILE = "jlora_adapter.json"
ARRAYS_DIR = "arrays"
STATE_FORMAT = "jlora.train_state"
STATE_FORMAT_VERSION = 1


_STATE_ITEMS = ("trainable", "opt_state", "rng")
_STATE_META_ITEM = "jlora"


def array_digest(x) -> str:
    """sha256 of an array's values (C order, its own dtype), the digest save and load compare. An
    array spread over several processes is gathered first (every process must call it)."""
    return hashlib.sha256(np.ascontiguousarray(to_host(x)).tobytes()).hexdigest()


def _digests(arrays: dict) -> dict:
    """``{key: array_digest}``, fetched in one transfer (arrays spread over several processes are
    gathered from all of them: the same digests on every process, whatever the mesh)."""
    return {k: array_digest(v) for k, v in to_host(dict(arrays)).items()}


def _host_local(x) -> bool:
    """A jax.Array on this process's devices only, in a run of many processes (a PRNG key made on
    each process, a tree built by ``jlora.apply`` before it was placed on the mesh)."""
    return jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def check_finite(tree, what: str) -> None:
    """Raises :class:`NonFiniteError` naming every leaf of ``tree`` (a pytree or a flat dict keyed by
    path) whose floating values are not all finite. Integer, boolean and PRNG-key leaves pass.
    One device round trip for all the device arrays in the tree.

    Example::

        check_finite(trainable, "save_state trainable")
    """
    flat, _ = flatten_with_paths(tree, is_leaf=lambda x: x is None)
    names, verdicts = [], []
    for leaf_path, leaf in flat:
        dtype = getattr(leaf, "dtype", None)
        if leaf is None or dtype is None or _is_key(leaf) or not jnp.issubdtype(dtype, jnp.inexact):
            continue
        names.append(leaf_path or "<root>")
        verdicts.append(jnp.isfinite(leaf).all() if isinstance(leaf, jax.Array) else bool(np.isfinite(leaf).all()))
    bad = [n for n, ok in zip(names, jax.device_get(verdicts)) if not ok]
    if bad:
        raise NonFiniteError(f"{what}: refusing to write NaN/Inf; non-finite values in {len(bad)} array(s): "
                             f"{bad[:8]}{f' (+{len(bad) - 8} more)' if len(bad) > 8 else ''}. The run diverged or "
                             f"a bad batch reached the parameters (jlora.train.make_step skips such updates)")


# ------------------------------------------------------------------------------------------
# helpers

def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p != "")


def _dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def _default_sharding():
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _sharding_of(x):
    """The sharding an array restored in place of ``x`` (same shape) should get."""
    s = getattr(x, "sharding", None)
    return s if isinstance(s, jax.sharding.Sharding) else _default_sharding()


def _factor_sharding(base, layout: Layout, field: str):
    """Where a restored adapter array goes: split like the kernel's sharding says (A keeps the
    kernel's stack + input axes, B its stack + output axes, vectors its stack axes), so a tree laid
    out by partition rules gets its factors laid out by the same rules; replicated otherwise."""
    s = getattr(base, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding) and len(tuple(s.spec)) <= layout.ndim:
        a, b, vector = factor_specs(s.spec, layout)
        return jax.sharding.NamedSharding(s.mesh, {"a": a, "b": b}.get(field, vector))
    return _replicated_like(base)


def _replicated_like(x):
    """A sharding for a factor stored next to base ``x``: replicated over the base's devices."""
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    if isinstance(s, jax.sharding.SingleDeviceSharding):
        return s
    if isinstance(s, jax.sharding.Sharding) and len(s.device_set) == 1:
        return jax.sharding.SingleDeviceSharding(next(iter(s.device_set)))
    return _default_sharding()


def _checkpointer():
    return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _atomic_write(path, overwrite: bool, write, *, collective: bool = False):
    """Calls ``write(tmp_dir)`` on a fresh temporary sibling of ``path`` and renames it into place.

    On any failure the temporary directory is removed and ``path`` is left as it was. With many
    processes the temporary directory's name comes from process 0, ``write`` runs on process 0
    only (or on every process with ``collective``, for Orbax saves, which coordinate themselves;
    ``write`` then writes its single files on process 0), and process 0 renames it after a barrier.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    parent, name = os.path.split(path)
    if jax.process_count() > 1:
        return _atomic_write_many(path, parent, name, write, collective)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{name}.jlora-tmp-", dir=parent)
    try:
        target = os.path.join(scratch, "new")
        write(target)
        _rename_into_place(target, path, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _rename_into_place(target: str, path: str, scratch: str) -> None:
    if os.path.lexists(path):
        old = os.path.join(scratch, "old")
        os.rename(path, old)
        try:
            os.rename(target, path)
        except BaseException:
            os.rename(old, path)
            raise
    else:
        os.rename(target, path)


def _atomic_write_many(path, parent, name, write, collective):
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint32))
    scratch = os.path.join(parent, f".{name}.jlora-tmp-{''.join(f'{int(t):08x}' for t in np.asarray(token))}")
    target = os.path.join(scratch, "new")
    main = is_main_process()
    try:
        if main:
            os.makedirs(scratch)
        barrier(f"jlora-write-begin-{name}")
        if collective or main:
            write(target)
        barrier(f"jlora-write-end-{name}")
        if main:
            _rename_into_place(target, path, scratch)
        barrier(f"jlora-write-renamed-{name}")
    finally:
        if main:
            shutil.rmtree(scratch, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------
# adapters

def _array_record(key: str, x, arrays: dict) -> dict:
    arrays[key] = x
    return {"key": key, "shape": list(np.shape(x)), "dtype": _dtype_name(x.dtype)}


def _node_record(path: str, node: AdaptedWeight, arrays: dict) -> dict:
    """The JSON record of one node; its arrays go into ``arrays``. Each adapter's state is stored
    field by field: ``a`` / ``b`` as themselves, its other trainable arrays under ``extra`` and its
    frozen ones under ``cache`` (the version-2 layout, so older jlora reads it)."""
    names = list(node.names)
    meta = node.meta
    missing = [n for n in names if node.states[n].missing() and not meta[n].group]
    if node.base is None or missing:
        raise ValueError(
            f"save_adapter needs the full adapted tree (jlora.combine(trainable, frozen)); node {path!r} "
            f"has no {'base' if node.base is None else f'factors for {missing}'}")
    adapters = []
    for n in names:
        rec = {"name": n, **dataclasses.asdict(meta[n])}
        state = node.states[n]
        extra, cache = {}, {}
        for k, v in state.arrays().items():
            if v is None:
                continue
            if k in ("a", "b"):
                rec[k] = _array_record(_join(path, k, n), v, arrays)
            elif k in state.frozen:
                cache[k] = _array_record(_join(path, "cache", n, k), v, arrays)
            else:
                extra[k] = _array_record(_join(path, "extra", n, k), v, arrays)
        if extra:
            rec["extra"] = extra
        if cache:
            rec["cache"] = cache
        adapters.append(rec)
    inits = sorted({meta[n].init for n in names if rewrites_base(meta[n])})
    record = {
        "path": path,
        "base_shape": list(node.shape),
        "base_dtype": _dtype_name(node.dtype),
        "layout": dataclasses.asdict(node.layout),
        "adapters": adapters,
        "active": list(node.active),
        "base_key": None,
    }
    if inits:  # PiSSA / OLoRA: the base is a residual; keep it so the forward is reproduced
        record["base_key"] = _join(path, "base")
        arrays[record["base_key"]] = node.base
    return record


def _state_types(tree) -> list:
    """The adapter state classes present in ``tree``, in a stable order."""
    found = {}
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_adapter_leaf):
        if isinstance(leaf, AdaptedWeight):
            for state in leaf.states.values():
                found.setdefault(type(state), None)
    return list(found)


def save_adapter(path, adapted, spec=None, *, overwrite: bool = False) -> str:
    """Saves the adapter factors (every named adapter, active or not) and ``Trainable`` leaves of
    ``adapted``, plus a JSON description, as a directory at ``path``. Returns the absolute path.

    Frozen base weights are not saved, except the residual bases of PiSSA / OLoRA nodes (their
    initialisation rewrote the base). ``spec.to_json()`` is stored when ``spec`` is given.
    AdaLoRA adapters are saved truncated to their kept ranks (``jlora.methods.adalora.truncate``;
    the kept ranks go to the stored spec's ``rank_pattern``).
    The write is atomic; an existing ``path`` is only replaced with ``overwrite=True``.

    Example::

        adapted = jlora.apply(params, jlora.LoRA(rank=8, targets="kernel"), key=jax.random.key(0))
        jlora.io.save_adapter("out/adapter", adapted, spec=spec)
    """
    for state_type in _state_types(adapted):   # e.g. AdaLoRA drops its masked triplets
        adapted, spec = state_type.before_save(adapted, spec)
    flat, _ = flatten_with_paths(adapted, is_leaf=is_adapter_leaf)
    arrays, nodes, trainables, shared = {}, [], [], []
    reserved = tuple(k + "/" for k in reserved_keys(adapted))
    for leaf_path, leaf in flat:
        if reserved and leaf_path.startswith(reserved):
            # a method's shared parameters (tCURLoRA's cores and their frozen factors): all saved
            value = leaf.value if isinstance(leaf, Trainable) else leaf
            if value is None:
                raise ValueError(f"save_adapter needs the full adapted tree; {leaf_path!r} holds no value")
            if np.size(value) == 0:  # Orbax refuses empty arrays (e.g. tCURLoRA's u_im for n3 = 2)
                rec = {"key": None, "shape": list(np.shape(value)), "dtype": _dtype_name(value.dtype)}
            else:
                rec = _array_record(leaf_path, value, arrays)
            shared.append({**rec, "path": leaf_path, "trainable": isinstance(leaf, Trainable)})
        elif isinstance(leaf, AdaptedWeight):
            nodes.append(_node_record(leaf_path, leaf, arrays))
        elif isinstance(leaf, Trainable):
            if leaf.value is None:
                raise ValueError(f"Trainable leaf {leaf_path!r} holds no value")
            key = _join(leaf_path, "value")
            arrays[key] = leaf.value
            trainables.append({"path": leaf_path, "key": key, "shape": list(np.shape(leaf.value)),
                               "dtype": _dtype_name(leaf.value.dtype)})
        elif is_adapter_leaf(leaf):
            raise NotImplementedError(f"save_adapter does not know how to save {type(leaf).__name__} at {leaf_path!r}")
    if not nodes and not trainables:
        raise ValueError("save_adapter: the tree has no adapter nodes or Trainable leaves; did you pass the plain params?")
    if spec is not None and not hasattr(spec, "to_json"):
        raise TypeError(f"spec must be a jlora spec with .to_json(), got {spec!r}")
    if jax.process_count() > 1:   # adapters are small: every process holds them whole, process 0 writes
        arrays = to_host(arrays)
    check_finite(arrays, f"save_adapter({os.fspath(path)!r})")
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "jlora_version": __version__,
            "nodes": nodes, "trainables": trainables, **({"shared": shared} if shared else {}),
            "spec": None if spec is None else spec.to_json(),
            "sha256": _digests(arrays)}
    meta["meta_sha256"] = _meta_digest(meta)
    text = json.dumps(meta, indent=1)  # raises before anything lands at `path`

    def write(target):
        if is_main_process():
            os.makedirs(target)
        barrier("jlora-save-adapter-dir")
        _checkpointer().save(os.path.join(target, ARRAYS_DIR), args=ocp.args.StandardSave(arrays))
        if is_main_process():
            with open(os.path.join(target, META_FILE), "w") as f:
                f.write(text)

    return _atomic_write(path, overwrite, write, collective=True)


def read_adapter_metadata(path) -> dict:
    """The JSON description stored by :func:`save_adapter` (validated format and version)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no adapter checkpoint directory at {path}")
    meta_file = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_file):
        hint = (" (it looks like a plain Orbax checkpoint, e.g. from save_merged; restore it with "
                "orbax.checkpoint.StandardCheckpointer().restore)") if os.path.exists(
                    os.path.join(path, "_CHECKPOINT_METADATA")) else ""
        raise CheckpointError(f"{path} is not a jlora adapter checkpoint: it has no {META_FILE}{hint}")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{meta_file} is not readable JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a jlora adapter checkpoint ({META_FILE} has format "
                              f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    if meta.get("version") not in SUPPORTED_VERSIONS:
        raise CheckpointError(f"{path}: unknown jlora adapter format version {meta.get('version')!r}; "
                              f"this jlora reads versions {list(SUPPORTED_VERSIONS)} (upgrade jlora?)")
    if meta["version"] >= 3 and meta.get("meta_sha256") != _meta_digest(meta):
        raise CorruptCheckpointError(
            f"{meta_file} does not match the digest recorded when it was saved: it was edited or damaged "
            f"(scales, ranks, active adapters or dtypes in it may no longer describe the arrays). Save the "
            f"adapter again rather than editing its metadata")
    return meta


def _adapter_meta(fields: dict, where: str) -> AdapterMeta:
    known = {f.name for f in dataclasses.fields(AdapterMeta)}
    values = {k: v for k, v in fields.items() if k in known}
    try:
        return AdapterMeta(**values)
    except TypeError as e:
        raise CheckpointError(f"bad adapter metadata for {where}: {e}") from None


def load_adapter(path, params):
    """Re-creates the adapted tree saved by :func:`save_adapter` on top of ``params``.

    ``params`` is the plain model (Linen dict / FrozenDict or NNX ``State``) with the same paths,
    or an already adapted tree (its nodes' bases are used; nodes the checkpoint does not name
    are kept as they are). Each recorded node becomes a :class:`AdaptedWeight` with the saved factors,
    adapters and active names; PiSSA / OLoRA nodes get their saved residual base. Raises
    :class:`CheckpointError` naming the path and both shapes/dtypes when ``params`` does not fit.

    Example::

        params = model.init(key, x)                      # or the pretrained weights
        adapted = jlora.io.load_adapter("out/adapter", params)
        y = jlora.lift(model.apply)(adapted, x)
    """
    meta = read_adapter_metadata(path)
    path = os.path.abspath(os.fspath(path))
    for key, (placeholders, _) in saved_entries().items():   # e.g. a saved prompt onto plain params
        records = [r for r in meta.get("trainables", []) if r["path"].split("/", 1)[0] == key]
        if records and not (isinstance(params, Mapping) and key in params):
            params = with_entry(params, key, placeholders(records))
    flat, treedef = flatten_with_paths(params, is_leaf=is_adapter_leaf)
    index = {p: i for i, (p, _) in enumerate(flat)}

    problems, bases, placements = [], {}, {}

    def check(record, kind):
        p = record["path"]
        if p not in index:
            problems.append(f"{p!r}: not found in params (closest: {near_misses([p], list(index), n=3)})")
            return
        leaf = flat[index[p]][1]
        base = leaf.base if isinstance(leaf, AdaptedWeight) else leaf.value if isinstance(leaf, Trainable) else leaf
        shape = list(record["base_shape"] if kind == "node" else record["shape"])
        dtype = record["base_dtype"] if kind == "node" else record["dtype"]
        if not (hasattr(base, "shape") and hasattr(base, "dtype")):
            problems.append(f"{p!r}: params hold {type(base).__name__}, not an array of shape {tuple(shape)}")
            return
        if list(np.shape(base)) != shape or _dtype_name(base.dtype) != dtype:
            problems.append(f"{p!r}: checkpoint has shape {tuple(shape)} {dtype}, params have shape "
                            f"{tuple(np.shape(base))} {_dtype_name(base.dtype)}")
            return
        bases[p] = base

    for record in meta["nodes"]:
        check(record, "node")
    for record in meta["trainables"]:
        check(record, "trainable")
    if problems:
        raise CheckpointError(f"adapter checkpoint {path} does not fit these params:\n  " + "\n  ".join(problems))

    abstract = {}
    for record in meta["nodes"]:
        base = bases[record["path"]]
        layout = Layout(**record["layout"])
        for ad in record["adapters"]:
            entries = [(f, ad[f]) for f in ("a", "b") if f in ad]
            entries += [("vector", e) for kind in ("extra", "cache") for e in ad.get(kind, {}).values()]
            for field, e in entries:
                abstract[e["key"]] = jax.ShapeDtypeStruct(
                    tuple(e["shape"]), jnp.dtype(e["dtype"]), sharding=_factor_sharding(base, layout, field))
        if record.get("base_key"):
            abstract[record["base_key"]] = jax.ShapeDtypeStruct(
                tuple(record["base_shape"]), jnp.dtype(record["base_dtype"]), sharding=_sharding_of(base))
    for record in meta["trainables"]:
        base = bases[record["path"]]
        abstract[record["key"]] = jax.ShapeDtypeStruct(tuple(record["shape"]), jnp.dtype(record["dtype"]),
                                                       sharding=_sharding_of(base))
    some_base = next(iter(bases.values()), None)
    for record in meta.get("shared", ()):
        if record["key"] is None:
            continue
        abstract[record["key"]] = jax.ShapeDtypeStruct(tuple(record["shape"]), jnp.dtype(record["dtype"]),
                                                       sharding=_replicated_like(some_base))
    arrays_dir = os.path.join(path, ARRAYS_DIR)
    try:
        arrays = _checkpointer().restore(arrays_dir, args=ocp.args.StandardRestore(abstract))
    except FileNotFoundError as e:
        raise CorruptCheckpointError(f"adapter checkpoint {path} has no readable {ARRAYS_DIR}/ ({e})") from None
    except Exception as e:  # noqa: BLE001 - TensorStore / Orbax report damage in many ways
        raise CorruptCheckpointError(f"adapter checkpoint {path}: the arrays in {arrays_dir} cannot be read, the "
                                     f"files are damaged or truncated ({_first_line(e)})") from None
    _verify_digests(arrays, meta.get("sha256"), f"adapter checkpoint {path} ({arrays_dir})")

    for record in meta["nodes"]:
        p = record["path"]
        names = [ad["name"] for ad in record["adapters"]]
        placements[p] = AdaptedWeight.from_parts(
            base=arrays[record["base_key"]] if record.get("base_key") else bases[p],
            a={ad["name"]: arrays[ad["a"]["key"]] for ad in record["adapters"] if "a" in ad},
            b={ad["name"]: arrays[ad["b"]["key"]] for ad in record["adapters"] if "b" in ad},
            extra={ad["name"]: {k: arrays[e["key"]] for k, e in ad["extra"].items()}
                   for ad in record["adapters"] if ad.get("extra")},
            cache={ad["name"]: {k: arrays[e["key"]] for k, e in ad["cache"].items()}
                   for ad in record["adapters"] if ad.get("cache")},
            layout=Layout(**record["layout"]),
            adapters=tuple((ad["name"], _adapter_meta(ad, f"{p!r}/{ad['name']}")) for ad in record["adapters"]),
            active=tuple(n for n in record["active"] if n in names),
            path=p)
    for record in meta["trainables"]:
        placements[record["path"]] = Trainable(arrays[record["key"]], record["path"])
    leaves = [placements.get(p, leaf) for p, leaf in flat]
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    if meta.get("shared"):  # a method's shared parameters go back under their reserved top-level key
        extra = {}
        for record in meta["shared"]:
            *parents, last = record["path"].split("/")
            d = extra
            for part in parents:
                d = d.setdefault(part, {})
            value = (jnp.zeros(tuple(record["shape"]), record["dtype"]) if record["key"] is None
                     else arrays[record["key"]])
            d[last] = Trainable(value, record["path"]) if record["trainable"] else value
        clash = [k for k in extra if k in tree]
        if clash:
            raise CheckpointError(f"adapter checkpoint {path} adds {clash} but params already hold them")
        tree = type(tree)({**tree, **extra})
    return tree


# ------------------------------------------------------------------------------------------
# merged

def _to_pure(tree):
    """FrozenDict / NNX State -> nested plain dicts (what plain Orbax restores)."""
    to_pure = getattr(tree, "to_pure_dict", None)
    if callable(to_pure):
        return to_pure()
    return unfreeze(tree)


def _verify_digests(arrays: dict, digests: dict | None, where: str) -> None:
    """Compares restored arrays with the sha256 digests recorded at save (absent in old formats)."""
    if digests is None:
        return
    recorded = {k: v for k, v in arrays.items() if digests.get(k) is not None}
    bad = [k for k, got in _digests(recorded).items() if got != digests[k]]
    if bad:
        raise CorruptCheckpointError(f"{where}: {len(bad)} array(s) differ from the sha256 recorded when they were "
                                     f"saved, the files are damaged: {bad[:8]}")


def save_merged(path, adapted, *, dtype=None, overwrite: bool = False) -> str:
    """Saves ``jlora.merge(adapted, dtype)`` (plain weights, as nested dicts) with Orbax's
    standard handler, atomically. No jlora is needed to read it back::

        jlora.io.save_merged("out/merged", adapted)
        params = orbax.checkpoint.StandardCheckpointer().restore("out/merged")

    The weights are written as host (NumPy) arrays, so the export carries no device
    topology: one trained on a GPU or a TPU slice restores without a target tree on any
    machine (device arrays would make plain Orbax refuse with "Topology mismatch").
    """
    merged = to_host(_to_pure(_merge(adapted, dtype)))   # on every process; Orbax writes host arrays from process 0
    check_finite(merged, f"save_merged({os.fspath(path)!r})")

    def write(target):
        _checkpointer().save(target, args=ocp.args.StandardSave(merged))

    return _atomic_write(path, overwrite, write, collective=True)


# ------------------------------------------------------------------------------------------
# training state

class RestoredState(NamedTuple):
    step: int
    trainable: Any
    opt_state: Any
    rng: Any


def checkpoint_manager(directory, max_to_keep: int | None = 3, **options) -> ocp.CheckpointManager:
    """An ``orbax.checkpoint.CheckpointManager`` for :func:`save_state` / :func:`restore_state`
    keeping the newest ``max_to_keep`` steps (``options`` go to ``CheckpointManagerOptions``).
    Saves are asynchronous; call ``manager.wait_until_finished()`` / ``manager.close()`` at the end.

    Example::

        manager = jlora.io.checkpoint_manager("out/train", max_to_keep=3)
    """
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, **options)
    return ocp.CheckpointManager(checkpoint_directory(directory), options=opts)


def checkpoint_directory(directory):
    """What :func:`checkpoint_manager` hands Orbax: a remote path (``gs://bucket/run``, any
    ``scheme://``) untouched, for Orbax's own path layer (``etils.epath``); a local one made absolute."""
    text = os.fspath(directory)
    if not isinstance(text, str) or not text:
        raise ValueError(f"checkpoint directory must be a non-empty path, got {directory!r}")
    if "://" in text:
        return text
    return os.path.abspath(text)


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flatten_state(tree, item: str):
    """(flat dict key -> leaf, treedef, keys in leaf order). ``None`` entries are empty subtrees."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat, keys = {}, []
    for p, leaf in leaves:
        key = "/".join(key_to_str(k) for k in p) or "_"
        if key in flat:
            raise ValueError(f"{item}: two leaves share the path {key!r}; cannot checkpoint this tree")
        flat[key] = leaf
        keys.append(key)
    return flat, treedef, keys


def _describe(leaf) -> dict:
    if _is_key(leaf):
        data = jax.eval_shape(jax.random.key_data, leaf)
        return {"shape": list(data.shape), "dtype": _dtype_name(data.dtype), "prng_key": True}
    if not hasattr(leaf, "dtype"):
        leaf = np.asarray(leaf)
    return {"shape": list(np.shape(leaf)), "dtype": _dtype_name(leaf.dtype)}


def save_state(manager: ocp.CheckpointManager, step: int, trainable, opt_state, rng=None, *,
               wait: bool = False, force: bool = False) -> bool:
    """Saves ``trainable`` (from ``jlora.partition``), the optimizer state and PRNG key(s) as
    step ``step``. Trees may contain ``None``; typed keys are stored as ``jax.random.key_data``.
    Asynchronous unless ``wait=True``. Returns whether a checkpoint was written (the manager's
    save interval may skip steps unless ``force``).

    Example::

        jlora.io.save_state(manager, step, trainable, opt_state, rng)
    """
    items = {"trainable": trainable, "opt_state": opt_state, "rng": rng}
    args, description = {}, {}
    for item, tree in items.items():
        flat, _, keys = _flatten_state(tree, item)
        description[item] = {k: _describe(flat[k]) for k in keys}
        data = {k: (jax.random.key_data(v) if _is_key(v) else v if hasattr(v, "dtype") else np.asarray(v))
                for k, v in flat.items()}
        # with many processes, a value on this process's devices only (a PRNG key made on each
        # process) is saved as the host value it is (Orbax refuses host-local device arrays)
        data = {k: np.asarray(v) if _host_local(v) else v for k, v in data.items()}
        data = {k: v for k, v in data.items() if np.size(v) > 0}   # Orbax refuses zero-size arrays;
        host = to_host(data)                                            # they restore from their shape
        check_finite(host, f"save_state step {step} {item}")        # checked and hashed on the host: one
        for k, digest in _digests(host).items():                       # gather per array, none per check
            description[item][k]["sha256"] = digest
        if data:  # Orbax refuses empty items
            args[item] = ocp.args.StandardSave(data)
    meta = {"format": STATE_FORMAT, "version": STATE_FORMAT_VERSION, "items": description}
    args[_STATE_META_ITEM] = ocp.args.JsonSave(meta)
    saved = manager.save(int(step), args=ocp.args.Composite(**args), force=force)
    if wait:
        manager.wait_until_finished()
    return saved


def restore_state(manager: ocp.CheckpointManager, trainable_template, opt_state_template, rng_template=None,
                  step: int | None = None) -> RestoredState:
    """Restores what :func:`save_state` wrote at ``step`` (default: the latest) into the
    structure of the templates (e.g. ``jlora.partition(jlora.apply(...))[0]``,
    ``optimizer.init(that)`` and ``jax.random.key(0)``; arrays or ``jax.ShapeDtypeStruct``;
    leaves are placed with the template's sharding). Returns ``(step, trainable, opt_state, rng)``.

    Every array is checked against the sha256 recorded at save; damaged or truncated files raise
    :class:`CorruptCheckpointError`. Without ``step``, a damaged newest checkpoint is skipped with a
    warning and the one before it is restored (and so on), so a run killed mid-save, or a disk that
    flipped bits, loses only the steps since the last good checkpoint; a template that does not fit
    raises at once.

    Example::

        step, trainable, opt_state, rng = jlora.io.restore_state(manager, trainable, opt_state, rng)
    """
    manager.wait_until_finished()
    if step is not None:
        return _restore_step(manager, int(step), trainable_template, opt_state_template, rng_template)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no training checkpoints in {manager.directory}")
    damaged = []
    for s in steps:
        try:
            restored = _restore_step(manager, s, trainable_template, opt_state_template, rng_template)
        except CorruptCheckpointError as e:
            damaged.append(str(e))
            continue
        if damaged:
            warnings.warn(f"restored step {s} of {manager.directory}; newer checkpoints are damaged:\n  "
                          + "\n  ".join(damaged), RuntimeWarning, stacklevel=2)
        return restored
    raise CorruptCheckpointError(f"every training checkpoint in {manager.directory} is damaged:\n  "
                                 + "\n  ".join(damaged))


def _restore_step(manager, step: int, trainable_template, opt_state_template, rng_template) -> RestoredState:
    if step not in manager.all_steps():
        raise FileNotFoundError(f"no training checkpoint for step {step} in {manager.directory}; "
                                f"steps: {list(manager.all_steps())}")
    try:
        meta = manager.restore(step, args=ocp.args.Composite(**{_STATE_META_ITEM: ocp.args.JsonRestore()}))[_STATE_META_ITEM]
    except Exception as e:  # noqa: BLE001 - a damaged or half-written step
        raise CorruptCheckpointError(f"training checkpoint step {step} in {manager.directory}: its metadata cannot be "
                                     f"read ({_first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"step {step} in {manager.directory} was not written by jlora.io.save_state")
    if meta.get("version") != STATE_FORMAT_VERSION:
        raise CheckpointError(f"unknown jlora training-state format version {meta.get('version')!r}")

    templates = {"trainable": trainable_template, "opt_state": opt_state_template, "rng": rng_template}
    plans, args, problems = {}, {}, []
    for item, tree in templates.items():
        if item == "rng" and tree is None:
            continue  # not asked for
        flat, treedef, keys = _flatten_state(tree, item)
        saved = meta["items"].get(item, {})
        missing = [k for k in keys if k not in saved]
        extra = [k for k in saved if k not in flat]
        if missing:
            problems.append(f"{item}: template leaves not in the checkpoint: {missing[:5]}"
                            f"{f' (+{len(missing) - 5} more)' if len(missing) > 5 else ''}")
        if extra:
            problems.append(f"{item}: checkpoint leaves not in the template: {extra[:5]}"
                            f"{f' (+{len(extra) - 5} more)' if len(extra) > 5 else ''}")
        abstract = {}
        for k in keys:
            if k not in saved:
                continue
            want = _describe(flat[k])
            if want != {f: v for f, v in saved[k].items() if f != "sha256"}:
                problems.append(f"{item} {k!r}: checkpoint has shape {tuple(saved[k]['shape'])} {saved[k]['dtype']}, "
                                f"template has shape {tuple(want['shape'])} {want['dtype']}")
                continue
            leaf = flat[k]
            if 0 in want["shape"]:   # zero-size: not in the files (see save_state)
                continue
            sharding = getattr(leaf, "sharding", None)
            if not isinstance(sharding, jax.sharding.Sharding) or want.get("prng_key"):
                sharding = _default_sharding()
            if jax.process_count() > 1 and sharding.is_fully_addressable:
                # a host-local template (a key made on each process): restore the host value
                abstract[k] = np.zeros(tuple(want["shape"]), jnp.dtype(want["dtype"]))
                continue
            abstract[k] = jax.ShapeDtypeStruct(tuple(want["shape"]), jnp.dtype(want["dtype"]), sharding=sharding)
        plans[item] = (flat, treedef, keys)
        if abstract:
            args[item] = ocp.args.StandardRestore(abstract)
    if problems:
        raise CheckpointError(f"training checkpoint step {step} in {manager.directory} does not fit the "
                              f"templates:\n  " + "\n  ".join(problems))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args)) if args else {}
    except Exception as e:  # noqa: BLE001 - TensorStore / Orbax report damage in many ways
        raise CorruptCheckpointError(f"training checkpoint step {step} in {manager.directory}: the arrays cannot be "
                                     f"read, the files are damaged or truncated ({_first_line(e)})") from None
    for item in args:
        _verify_digests(restored[item], {k: r.get("sha256") for k, r in meta["items"][item].items()},
                        f"training checkpoint step {step} in {manager.directory} ({item})")

    out = {"rng": None}
    for item, (flat, treedef, keys) in plans.items():
        values = restored[item] if item in args else {}
        leaves = []
        for k in keys:
            v = values[k] if k in values else jnp.zeros(meta["items"][item][k]["shape"], meta["items"][item][k]["dtype"])
            if _is_key(flat[k]):
                v = jax.random.wrap_key_data(v, impl=jax.random.key_impl(flat[k])) if isinstance(flat[k], jax.Array) \
                    else jax.random.wrap_key_data(v, impl=flat[k].dtype._impl)
            leaves.append(v)
        out[item] = jax.tree_util.tree_unflatten(treedef, leaves)
    return RestoredState(step, out["trainable"], out["opt_state"], out["rng"])
