"""Training utilities for adapted models. See :func:`jlora.train.make_step`."""

from jlora.train.loop import fit, plot_history, read_jsonl
from jlora.train.step import StepState, init_opt_state, make_step

__all__ = ["make_step", "init_opt_state", "StepState", "fit", "plot_history", "read_jsonl"]
