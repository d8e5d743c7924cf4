"""Parameter paths as strings (``params/layer_0/query/kernel``) and target matching."""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Sequence

import jax

_DROPPED_TRAILING = ("value", "raw_value")  # NNX Variable wrappers


def key_to_str(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: Sequence) -> str:
    """``(DictKey('params'), DictKey('Dense_0'), DictKey('kernel'))`` -> ``params/Dense_0/kernel``.

    NNX ``State`` paths end in the Variable's ``.value`` attribute; that part is dropped so
    Linen and NNX parameters read alike.
    """
    parts = [key_to_str(k) for k in path]
    if len(parts) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and parts[-1] in _DROPPED_TRAILING:
        parts = parts[:-1]
    return "/".join(parts)


def normalize_patterns(patterns, what: str) -> tuple[str, ...]:
    """Accepts a regex string, a list of names/regexes, or None; validates regex syntax."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise TypeError(f"{what} must be a regex string or a list of strings, got {patterns!r}") from None
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{what} entries must be non-empty strings, got {p!r}")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{what} pattern {p!r} is not a valid regex: {e}") from None
    return patterns


def matches(path: str, patterns: Iterable[str], modules: bool = True) -> bool:
    """PEFT-like matching: a pattern matches when it ``re.fullmatch``es the whole path, or
    when it names the path's last components (``"query"`` matches ``.../query/kernel``;
    ``"query/kernel"`` matches ``.../query/kernel``). With ``modules=False`` only the leaf-path
    forms count (not a pattern that names the leaf's parent module, like ``"query"``)."""
    parts = path.split("/")
    for p in patterns:
        if re.fullmatch(p, "/" + path):  # `.*/query/kernel` also matches a top-level `query/kernel`
            return True
        for start in range(len(parts)):
            if re.fullmatch(p, "/".join(parts[start:])):
                return True
        if not modules:
            continue
        for start in range(len(parts) - 1):
            if re.fullmatch(p, "/".join(parts[start:-1])):
                return True
    return False


def near_misses(patterns: Sequence[str], paths: Sequence[str], n: int = 8) -> list[str]:
    """Paths most similar to the patterns, for error messages."""
    scored = {}
    for pattern in patterns:
        literal = re.sub(r"[\\^$.*+?()\[\]{}|]", "", pattern).strip("/")
        for path in paths:
            parts = path.split("/")
            score = max(
                max(difflib.SequenceMatcher(None, literal, "/".join(parts[i:])).ratio() for i in range(len(parts))),
                difflib.SequenceMatcher(None, literal, path.split("/")[-1]).ratio(),
                max((difflib.SequenceMatcher(None, literal, part).ratio() for part in path.split("/")), default=0),
            )
            scored[path] = max(score, scored.get(path, 0.0))
    return [p for p, _ in sorted(scored.items(), key=lambda kv: -kv[1])[:n]]


def flatten_with_paths(tree, is_leaf=None):
    """List of ``(path_str, leaf)`` and the treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_to_str(p), leaf) for p, leaf in leaves], treedef
