"""Running a task over a dataset: predicted options and accuracy, batched, with a progress bar."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._io import as_rows as as_rows
from repinf_lens._io import is_example as is_example
from repinf_lens.task.base import MissingCapabilityError, SupportsCorrect, SupportsPredictions, Task, require, supports

__all__ = ["evaluate", "predict"]


def _iter_batches(dataset: Any, batch_size: int) -> Iterable[list[dict[str, Any]]]:
    rows = as_rows(dataset) if isinstance(dataset, Mapping) else dataset
    n = len(rows)
    for start in range(0, n, batch_size):
        if hasattr(rows, "select"):
            yield as_rows(rows[start : start + batch_size])
        else:
            yield [dict(r) for r in rows[start : start + batch_size]]


@torch.no_grad()
def predict(
    model: Any, task: Task, dataset: Any, *, batch_size: int = 8, progress: bool = True, desc: str = "predict"
) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Predicted and correct class (option) index for every example, batched, with a tqdm bar.

    Needs the ``predictions`` capability and ``batch.labels`` (classification tasks such as
    :class:`MultipleChoiceTask`); raises :class:`MissingCapabilityError` otherwise.
    """
    clf: SupportsPredictions = require(task, "predictions", needed_by="predict()")
    rows = as_rows(dataset) if isinstance(dataset, Mapping) else dataset
    if len(rows) == 0:
        raise ValueError("The dataset is empty. Fix: pass at least one example.")
    preds, labels = [], []
    n_batches = (len(rows) + batch_size - 1) // batch_size
    for part in tqdm(_iter_batches(rows, batch_size), total=n_batches, desc=desc, disable=not progress):
        batch = task.collate(part)
        if not hasattr(batch, "labels"):
            raise MissingCapabilityError(
                f"predict() compares predictions with batch.labels, which {type(batch).__name__} has not. Fix: "
                "use evaluate() with a task that has correct(), or give the batch labels [B]."
            )
        logits = task.model_logits(model, batch)
        preds.append(clf.predictions(logits, batch).cpu())
        labels.append(batch.labels.cpu())
    return torch.cat(preds), torch.cat(labels)


@torch.no_grad()
def evaluate(model: Any, task: Task, dataset: Any, *, batch_size: int = 8, progress: bool = True) -> float:
    """Accuracy (0-1) of ``model`` on ``dataset``: the mean of the task's ``correct(logits, batch)``.

    For :class:`MultipleChoiceTask` that is "the option letter with the largest logit is the key"; for
    :class:`CompletionTask` "greedy decoding reproduces the target". A task without ``correct`` but with
    ``predictions`` is scored ``predictions == batch.labels``; with neither, :class:`MissingCapabilityError`.
    """
    if not supports(task, "correct"):
        require(task, "predictions", needed_by="evaluate() (without a correct() capability)")
        preds, labels = predict(model, task, dataset, batch_size=batch_size, progress=progress, desc="evaluate")
        return float((preds == labels).float().mean())
    scorer: SupportsCorrect = require(task, "correct", needed_by="evaluate()")
    rows = as_rows(dataset) if isinstance(dataset, Mapping) else dataset
    if len(rows) == 0:
        raise ValueError("The dataset is empty. Fix: pass at least one example.")
    hits = []
    n_batches = (len(rows) + batch_size - 1) // batch_size
    for part in tqdm(_iter_batches(rows, batch_size), total=n_batches, desc="evaluate", disable=not progress):
        batch = task.collate(part)
        hits.append(scorer.correct(task.model_logits(model, batch), batch).cpu())
    return float(torch.cat(hits).float().mean())
