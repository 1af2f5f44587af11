"""Tasks: how examples become tokens, which positions the loss reads, and which loss is attributed.

* :mod:`~repinf_lens.task.base`: the :class:`Task` contract a user implements (every method the package calls,
  documented), the batch protocol, optional capabilities (:func:`supports` / :func:`require`).
* :mod:`~repinf_lens.task.mcqa`: :class:`MultipleChoiceTask`, the paper's multiple-choice QA.
* :mod:`~repinf_lens.task.completion`: :class:`CompletionTask`, prompt -> target text (mean NLL of the target).
* :mod:`~repinf_lens.task.evaluate`: :func:`evaluate` and :func:`predict` over a dataset.

Sign convention: the task's loss is minimised; POSITIVE influence = proponent (up-weighting the training example
lowers the test loss).
"""

from repinf_lens.task.base import (
    CAPABILITIES,
    HasTokenizer,
    MissingCapabilityError,
    PromptTooLongError,
    SupportsCorrect,
    SupportsEncode,
    SupportsOptionLogits,
    SupportsPredictions,
    Task,
    TaskBatch,
    TaskBatchMixin,
    check_batch,
    check_fits,
    gather_positions,
    is_example,
    require,
    supports,
    task_config,
    token_batches,
)
from repinf_lens.task.completion import CompletionBatch, CompletionTask, mcqa_to_completion
from repinf_lens.task.evaluate import evaluate, predict
from repinf_lens.task.mcqa import LETTERS, MCQABatch, MultipleChoiceTask, parse_option

__all__ = [
    "CAPABILITIES",
    "LETTERS",
    "CompletionBatch",
    "CompletionTask",
    "HasTokenizer",
    "MCQABatch",
    "MissingCapabilityError",
    "MultipleChoiceTask",
    "PromptTooLongError",
    "SupportsCorrect",
    "SupportsEncode",
    "SupportsOptionLogits",
    "SupportsPredictions",
    "Task",
    "TaskBatch",
    "TaskBatchMixin",
    "check_batch",
    "check_fits",
    "evaluate",
    "gather_positions",
    "is_example",
    "mcqa_to_completion",
    "parse_option",
    "predict",
    "require",
    "supports",
    "task_config",
    "token_batches",
]
