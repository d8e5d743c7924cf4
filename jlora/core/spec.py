"""The method protocol: the base class every method's spec derives from.

A spec is a frozen dataclass of hyper-parameters. :func:`jlora.apply` asks it:

* which leaves it targets (``targets`` / ``exclude`` / ``train_also`` patterns, ``axes`` hints);
* :meth:`AdapterSpec.init_state`: the typed state (:mod:`jlora.core.state`) of one adapter on one
  kernel, the base it leaves (PiSSA / OLoRA rewrite it, QLoRA quantises it) and its static
  :class:`jlora.core.nodes.AdapterMeta`;
* :meth:`AdapterSpec.frozen_patterns` / :meth:`AdapterSpec.quantize_base`: frozen leaves it
  rewrites without adapting them (QLoRA's ``quantize_frozen``);
* ``shares_parameters`` / :meth:`AdapterSpec.apply_tree`: methods whose parameters are shared by
  several kernels (tCURLoRA) adapt the whole tree at once instead of leaf by leaf.

A method's module holds its spec, its state class (registered with
:func:`jlora.core.state.register_state_type`) and its maths; nothing in ``jlora.core`` names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

from jlora.core.nodes import Layout
from jlora.core.paths import normalize_patterns


def Axes(stack: int = 0, inputs: int = 1, outputs: int | None = None):
    """An axis hint for ``spec.axes``: ``{"pattern": jlora.Axes(stack=1, inputs=1)}``.

    ``outputs`` defaults to "the remaining axes" and is filled in when the leaf is seen.
    """
    return (stack, inputs, outputs)


def resolve_hint(hint, shape, path: str) -> Layout:
    if isinstance(hint, Layout):
        layout = hint
    else:
        try:
            stack, inputs, outputs = (tuple(hint) + (None,))[:3]
        except TypeError:
            raise TypeError(f"axes hint for {path!r} must be jlora.Axes(stack=, inputs=) or a Layout, got {hint!r}") from None
        if outputs is None:
            outputs = len(shape) - stack - inputs
        layout = Layout(int(stack), int(inputs), int(outputs))
    if layout.ndim != len(shape):
        raise ValueError(
            f"axes hint {layout} for {path!r} covers {layout.ndim} axes but the leaf has shape {tuple(shape)}")
    return layout


#: what a CliField's value must be (the ``jlora`` command checks it and names the flag when it is not)
CLI_KINDS = ("positive_int", "int>=0", "optional_positive_int", "positive_number", "number>=0", "choice",
             "optional_str", "flag_off")


@dataclasses.dataclass(frozen=True)
class CliField:
    """A setting a method adds to ``jlora train``: the config key ``name`` (flag ``--name`` with
    dashes; ``flag_off`` kinds are ``--no-name``), its default, its help text and its ``kind``
    (one of :data:`CLI_KINDS`; ``choices`` for ``"choice"``)."""

    name: str
    default: Any
    help: str
    kind: str = "optional_str"
    choices: tuple = ()

    def __post_init__(self):
        if self.kind not in CLI_KINDS:
            raise ValueError(f"CliField {self.name!r}: kind must be one of {CLI_KINDS}, got {self.kind!r}")


class CliMethod:
    """What a method contributes to the ``jlora`` command (mixed into every spec class):
    ``cli_method`` (its ``--method`` name, None when not offered), ``cli_fields`` (its own settings)
    and :meth:`from_cli` (the spec for a validated command configuration)."""

    cli_method: ClassVar[str | None] = None
    cli_fields: ClassVar[tuple] = ()

    @classmethod
    def from_cli(cls, settings: Mapping, common: Mapping, context):
        """The spec for ``jlora train --method <cli_method>``. ``settings``: the command's validated
        settings (``cli_fields`` among them); ``common``: the arguments every low-rank method shares
        (rank, alpha, targets, exclude, rslora, init, dropout, train_also); ``context``: what the
        command knows of the run (``context.family``, ``context.calibration()``)."""
        return cls(**common)


@dataclasses.dataclass(frozen=True)
class AdapterSpec(CliMethod):
    """Fields every method shares. Subclasses add their own hyper-parameters."""

    targets: Any = None
    exclude: Any = None
    train_also: Any = None
    axes: Mapping[str, Any] | None = None

    method = "base"

    #: the method adapts several leaves jointly from shared parameters: ``jlora.apply`` calls
    #: :meth:`apply_tree` instead of :meth:`init_state` per leaf
    shares_parameters: ClassVar[bool] = False

    def init_state(self, key, base, layout: Layout, path: str, embedding: bool = False):
        """``(state, new_base, meta)`` for one targeted leaf: the adapter's typed state, the base the
        node keeps (``base`` itself unless the method rewrites it) and its static AdapterMeta."""
        raise NotImplementedError(f"{type(self).__name__} must implement init_state (or set shares_parameters)")

    def apply_tree(self, params, key, *, name: str, model=None, example=None):
        """Adapts the whole tree (only for ``shares_parameters`` methods)."""
        raise NotImplementedError(f"{type(self).__name__} adapts leaf by leaf (init_state), not apply_tree")

    def frozen_patterns(self) -> tuple:
        """Patterns of leaves the method rewrites without adapting them (:meth:`quantize_base`)."""
        return ()

    def quantize_base(self, base, layout: Layout):
        raise NotImplementedError(f"{type(self).__name__} does not rewrite frozen leaves")

    def _check_float_dtype(self, field: str):
        """Raises TypeError unless ``self.<field>`` names a floating dtype."""
        value = getattr(self, field)
        try:
            ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
        except TypeError:
            ok = False
        if not ok:
            raise TypeError(f"{type(self).__name__} {field} must be a floating dtype, got {value!r}")

    def _validate_common(self):
        targets = normalize_patterns(self.targets, "targets")
        if not targets:
            raise ValueError(f"{type(self).__name__}.targets must name at least one parameter path pattern, got {self.targets!r}")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "exclude", normalize_patterns(self.exclude, "exclude"))
        object.__setattr__(self, "train_also", normalize_patterns(self.train_also, "train_also"))
        if self.axes is not None:
            if not isinstance(self.axes, Mapping):
                raise TypeError(f"axes must map path patterns to jlora.Axes(...) hints, got {self.axes!r}")
            normalize_patterns(tuple(self.axes), "axes")
            object.__setattr__(self, "axes", tuple(self.axes.items()))

    def axes_hints(self) -> tuple:
        return tuple(self.axes or ())

    def to_json(self) -> dict:
        """A JSON-serialisable description (used by checkpoints)."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and value and isinstance(value[0], tuple):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value}
            elif isinstance(value, tuple):
                value = list(value)
            elif hasattr(value, "dtype") or type(value).__module__.startswith(("numpy", "jax")):
                value = str(getattr(value, "__name__", value))
            out[f.name] = value
        return out
