"""Logical partition rules: a model names what each axis of a weight *is* (``embed``, ``heads``,
``mlp``, ``vocab``, ``layers``), and an axis map says which mesh axes each of those is split over,
MaxText-style. Resolved against a mesh, mesh axes the mesh lacks are dropped, so one set of rules
serves one device, pure data parallelism, FSDP and FSDP x tensor parallelism.

Example::

    from jlora.distributed import make_mesh, resolve_rules, shardings_for
    mesh = make_mesh((2, 4), ("data", "fsdp"))
    rules = resolve_rules(config.partition_rules(), mesh)   # [(regex, PartitionSpec), ...]
    # q_proj kernel (embed, heads) -> P('fsdp', None) here; P('fsdp', 'tensor') on a mesh with 'tensor'
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, Sequence

from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

__all__ = ["DEFAULT_AXIS_MAP", "resolve_rules", "load_rules"]

#: logical axis -> mesh axis (or axes, or None: never split). ``batch`` is what the step splits the
#: batch over; the weights' ``embed`` axis is FSDP's, the rest is tensor parallelism's.
DEFAULT_AXIS_MAP: Mapping[str, object] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}


def _mesh_axes(entry, axis_map, where) -> tuple:
    if entry is None:
        return ()
    if not isinstance(entry, str):
        raise TypeError(f"{where}: a logical axis must be a name (str) or None, got {entry!r}")
    if entry not in axis_map:
        raise ValueError(f"{where}: logical axis {entry!r} is not in the axis map, whose names are "
                         f"{sorted(axis_map)}; add it (axis_map={{{entry!r}: 'fsdp', ...}}) or use None")
    target = axis_map[entry]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def resolve_rules(logical_rules: Sequence, mesh: Mesh, axis_map: Mapping | None = None) -> list:
    """Concrete ``[(regex, PartitionSpec)]`` rules for ``mesh`` from ``[(regex, (logical axis or None,
    ...))]``: each logical axis becomes the mesh axes ``axis_map`` (default :data:`DEFAULT_AXIS_MAP`)
    names, less those the mesh does not have and those an earlier axis of the same spec already
    took (one mesh axis can split only one array axis)."""
    if not isinstance(mesh, (Mesh, AbstractMesh)):   # an AbstractMesh: shapes only (planning, jlora.estimate)
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see jlora.distributed.make_mesh) or AbstractMesh, got "
                        f"{type(mesh).__name__}")
    axis_map = dict(DEFAULT_AXIS_MAP if axis_map is None else axis_map)
    present = set(mesh.shape)
    out = []
    for i, rule in enumerate(logical_rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"logical rule {i} must be a (regex, (logical axes...)) pair, got {rule!r}")
        pattern, axes = rule
        where = f"logical rule {i} ({pattern!r})"
        used: set = set()
        entries = []
        for entry in tuple(axes):
            names = [n for n in _mesh_axes(entry, axis_map, where) if n in present and n not in used]
            used.update(names)
            entries.append(None if not names else names[0] if len(names) == 1 else tuple(names))
        out.append((pattern, P(*entries)))
    return out


def _spec_entry(entry, where):
    if entry is None or isinstance(entry, str):
        return entry
    if isinstance(entry, list) and all(isinstance(n, str) for n in entry):
        return tuple(entry)
    raise ValueError(f"{where}: a spec entry must be a mesh axis name, a list of names, or null, got {entry!r}")


def load_rules(path) -> list:
    """Partition rules from a JSON file: ``[["regex", ["fsdp", null]], ...]`` (mesh axis names; a
    list of names splits one array axis over several mesh axes; ``null`` leaves it whole). Raises
    ``ValueError`` naming the file and the bad entry."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the rules file {path!r}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"rules file {path!r} is not valid JSON: {e}") from None
    if not isinstance(raw, list):
        raise ValueError(f"rules file {path!r} must hold a JSON list of [regex, [axes...]] pairs, got "
                         f"{type(raw).__name__}")
    out = []
    for i, rule in enumerate(raw):
        where = f"rules file {path!r}, rule {i}"
        if not (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str) and isinstance(rule[1], list)):
            raise ValueError(f"{where}: expected [\"regex\", [axes...]], got {rule!r}")
        try:
            re.compile(rule[0])
        except re.error as e:
            raise ValueError(f"{where}: {rule[0]!r} is not a valid regex: {e}") from None
        out.append((rule[0], P(*(_spec_entry(e, where) for e in rule[1]))))
    return out
