"""jlora's error hierarchy: every error jlora raises on purpose derives from :class:`Error`.

Each class also derives from the built-in exception that code written before the hierarchy
caught (``ValueError`` / ``RuntimeError``), so ``except ValueError`` keeps working.

- :class:`FactoringError`: ``jlora.lift(fn, strict=True)`` met an op it cannot keep factored.
- :class:`CheckpointError`: a checkpoint that cannot be read or does not fit the parameters;
  :class:`CorruptCheckpointError` when its files are damaged, :class:`PeftFormatError` for a PEFT
  adapter directory.
- :class:`NonFiniteError`: a save refused because an array holds NaN or Inf.
"""

from __future__ import annotations


class Error(Exception):
    """Base class of the errors jlora raises on purpose (``except jlora.Error``)."""


class FactoringError(Error, RuntimeError):
    """Raised by ``lift(fn, strict=True)`` when an adapted weight would be materialised."""


class CheckpointError(Error, ValueError):
    """A checkpoint that cannot be read, or that does not fit the parameters given."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged: unreadable, truncated, or not matching the sha256 digests
    recorded when it was saved (bit rot, a partial copy, a hand-edited metadata file)."""


class PeftFormatError(CheckpointError):
    """A PEFT adapter directory that cannot be read or does not fit the parameters given."""


class NonFiniteError(Error, ValueError):
    """A save refused because an array holds NaN or Inf: a checkpoint is never written with one."""
