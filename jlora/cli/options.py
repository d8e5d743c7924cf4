"""Options shared by the CLI's tasks and commands."""

#: data options (CLI flags) and their defaults; None columns are detected from the file
DATA_OPTIONS = dict(text_column=None, label_column="label", prompt_column=None, response_column=None,
                    messages_column=None, validation_file=None, test_file=None, packing=False, image_column=None)


def add_decoding_args(p) -> None:
    """The decoding flags of ``jlora generate`` and ``jlora evaluate``."""
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0 samples with --seed")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="prompts decoded together")


class SealedSplitError(RuntimeError):
    """The test split was read while a run was still training or selecting."""


def check_unsealed(task, split: str) -> None:
    """Refuses to read ``split`` when the task has it sealed: ``jlora train`` seals ``test`` until
    the adapter is final (the best checkpoint chosen, early stopping decided), so that nothing that
    selects a model or a hyper-parameter ever sees it. ``task.sealed`` is the set of sealed splits."""
    if split in getattr(task, "sealed", ()):
        raise SealedSplitError(f"the {split!r} split is sealed until training ends: model selection, early stopping "
                               f"and evaluation during training read 'validation' only; evaluate the test split once, "
                               f"on the final adapter (jlora evaluate --run DIR)")
