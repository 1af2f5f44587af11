"""Tasks: how examples become tokens, which positions the loss reads, and which loss is attributed.

:class:`Task` is the contract a user implements (in the spirit of Kronfluence's ``Task``); finetuning, SAE
training, curvature and influence all go through it. Two tasks ship:

* :class:`MultipleChoiceTask` (the paper's): multiple-choice QA scored by the option letters' logits at the
  answer position (one loss position per example).
* :class:`CompletionTask`: prompt -> target text, loss = mean negative log-likelihood of the target tokens
  (several loss positions per example; MedQA's answer text, instruction data, ...).

The contract, in short (details on :class:`Task` and :class:`TaskBatch`):

* ``collate(examples) -> batch``: a right-padded :class:`TaskBatch` (``tokens``, ``attention_mask``,
  ``answer_pos``, ``ids``, ``to(device)``, ``len``).
* ``loss(logits, batch, reduction) -> loss``: logits AT ``batch.answer_pos`` (``[B, V]`` or ``[B, P, V]``) ->
  the per-example loss (``"none"``) or its mean / sum. The loss is minimised; POSITIVE influence = proponent
  (up-weighting the training example lowers the test loss).
* optional capabilities (:data:`CAPABILITIES`), looked up with :func:`supports` / :func:`require`:
  ``predictions``, ``option_logits``, ``correct``, ``encode``, ``tokenizer``. A function that needs one the
  task lacks raises :class:`MissingCapabilityError` naming it, before any work.

Batches are right-padded. For a causal model that is exact without an attention mask (real tokens never attend
to later padding), so TransformerLens forwards need no mask; ``attention_mask`` is still provided for Hugging
Face training and to strip the padding from stored token ids.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from repinf_lens._io import as_rows as as_rows
from repinf_lens._io import is_example as is_example
from repinf_lens.errors import RepinfLensError

__all__ = [
    "CAPABILITIES",
    "HasTokenizer",
    "MissingCapabilityError",
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
    "gather_positions",
    "is_example",
    "require",
    "supports",
    "task_config",
    "token_batches",
]


class PromptTooLongError(RepinfLensError, ValueError):
    """A formatted prompt does not fit in the model's context (``n_ctx``)."""


class MissingCapabilityError(RepinfLensError, TypeError):
    """A function needs an optional capability of the task (``predictions``, ``option_logits``, ...) it lacks."""


# ---------------------------------------------------------------------------------------------------- contract
@runtime_checkable
class TaskBatch(Protocol):
    """What every batch returned by :meth:`Task.collate` provides (the package reads nothing else from it).

    Attributes:
        tokens: ``[B, T]`` token ids, RIGHT-padded (real tokens first; the pad id after them).
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding (stored token ids are cut at its sum).
        answer_pos: the positions whose next-token logits :meth:`Task.loss` reads: ``[B]`` (one per example,
            e.g. the last prompt token of a multiple-choice prompt) or ``[B, P]`` (several, e.g. every position
            that predicts a target token; pad the unused entries of shorter examples with any valid position and
            mask them in the loss). :class:`~repinf_lens.split.SplitModel` unembeds only these positions, so the
            logits the loss receives are ``[B, V]`` or ``[B, P, V]``.
        ids: the examples' ``id`` strings (named in errors and results).

    It must also have ``to(device)`` (a copy with every tensor on ``device``) and ``len(batch) == B``, and be a
    dataclass whose tensor and list fields are all indexed by example along their first dimension:
    :meth:`~repinf_lens.split.SplitInputs.slice` rebuilds sub-batches as ``type(batch)(**sliced_fields)``.
    Other fields (labels, targets, masks) are the task's own.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, " batch"] | Int[Tensor, "batch n_loss_pos"]
    ids: list[str]

    def to(self, device: str | torch.device) -> Any: ...

    def __len__(self) -> int: ...


_BATCH_FIELDS = ("tokens", "attention_mask", "answer_pos", "ids")


def check_batch(batch: Any, task: Any = None) -> None:
    """Raise :class:`MissingCapabilityError` when ``batch`` lacks what :class:`TaskBatch` promises."""
    missing = [f for f in _BATCH_FIELDS if not hasattr(batch, f)]
    if not callable(getattr(batch, "to", None)):
        missing.append("to(device)")
    if not dataclasses.is_dataclass(batch):
        missing.append("a dataclass (SplitInputs.slice rebuilds it field by field)")
    if missing:
        who = f"{type(task).__name__}.collate() returned" if task is not None else "The batch is"
        raise MissingCapabilityError(
            f"{who} a {type(batch).__name__} without {missing}, which the package reads from every batch "
            "(see repinf_lens.task.TaskBatch). Fix: return a dataclass with tokens [B, T] (right-padded), "
            "attention_mask [B, T], answer_pos [B] or [B, P] (the positions the loss reads), ids and to(device), "
            "like MCQABatch or CompletionBatch."
        )


def gather_positions(x: Tensor, pos: Tensor) -> Tensor:
    """``x[b, pos[b]]`` for ``x`` ``[B, T, ...]``: ``pos [B]`` gives ``[B, ...]``, ``pos [B, P]`` ``[B, P, ...]``."""
    idx = pos.to(x.device)
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, idx] if idx.ndim == 1 else x[rows[:, None], idx]


def token_batches(
    task: Any, rows: Sequence[Mapping[str, Any]], batch_size: int, max_tokens: int | None = None
) -> list[tuple[int, int]]:
    """Consecutive ``(lo, hi)`` ranges over ``rows`` for batched passes: at most ``batch_size`` rows each and,
    with ``max_tokens``, at most ``max_tokens`` PADDED tokens (rows x the longest row's length; a row longer than
    ``max_tokens`` gets a batch of its own). The order of the rows is kept, so results are written back by slice.

    Memory of a batched gradient grows with rows x length (x length again in attention), so a fixed
    ``batch_size`` that fits short prompts can exhaust memory on a batch of long ones (MedQA's prompts run from
    84 to 968 tokens); a token budget keeps the peak near that of ``batch_size`` prompts of length
    ``max_tokens / batch_size``. Batching never changes a score beyond float rounding.

    Lengths come from the task's ``encode`` capability when it has one, else from a one-row :meth:`Task.collate`.
    """
    n = len(rows)
    if max_tokens is None:
        return [(lo, min(n, lo + batch_size)) for lo in range(0, n, batch_size)]
    if supports(task, "encode"):
        lengths = [len(task.encode(r)) for r in rows]
    else:
        lengths = [int(task.collate([r]).tokens.shape[-1]) for r in rows]
    out: list[tuple[int, int]] = []
    lo, longest = 0, 0
    for i, length in enumerate(lengths):
        width = max(longest, length)
        if i > lo and (i - lo >= batch_size or (i - lo + 1) * width > max_tokens):
            out.append((lo, i))
            lo, width = i, length
        longest = width
    if n:
        out.append((lo, n))
    return out


@runtime_checkable
class SupportsPredictions(Protocol):
    """Capability ``predictions``: a class prediction per example, compared with ``batch.labels``."""

    def predictions(self, logits: Tensor, batch: Any) -> Int[Tensor, " batch"]:
        """``[B]`` predicted class (option) index from the loss-position logits (as :meth:`Task.loss` gets them).

        Used by :func:`predict`, :func:`evaluate` (when the task has no ``correct``), the report's "prediction
        after" (``pipeline.make_report``) and the query heatmap's metadata. Without it those raise
        :class:`MissingCapabilityError` (the heatmap just omits the prediction).
        """
        ...


@runtime_checkable
class SupportsOptionLogits(Protocol):
    """Capability ``option_logits``: one logit per answer option (multiple choice)."""

    def option_logits(self, logits: Tensor, batch: Any) -> Float[Tensor, "batch n_options"]:
        """``[B, K]`` logit of each option (``-inf`` for options an example lacks); ``batch.labels`` ``[B]`` indexes it.

        Used by the SAE layer sweep (``saes.layer_sweep`` / ``spliced_accuracy``) and the necessity/sufficiency
        ablations (``analysis.necessity_sufficiency``); without it they raise :class:`MissingCapabilityError`.
        """
        ...


@runtime_checkable
class SupportsCorrect(Protocol):
    """Capability ``correct``: whether the model answers each example correctly."""

    def correct(self, logits: Tensor, batch: Any) -> Bool[Tensor, " batch"]:
        """``[B]`` True where the example counts as answered correctly (accuracy = its mean).

        Used by :func:`evaluate` (and so by finetuning's evaluation). Without it :func:`evaluate` falls back to
        ``predictions == batch.labels``, and raises :class:`MissingCapabilityError` when that is missing too.
        """
        ...


@runtime_checkable
class SupportsEncode(Protocol):
    """Capability ``encode``: the token ids of one example as the model reads them."""

    def encode(self, example: Mapping[str, Any]) -> list[int]:
        """Token ids of the whole input sequence of ``example`` (prompt, and target for a completion).

        Used by finetuning to drop examples longer than ``max_length`` before training.
        """
        ...


@runtime_checkable
class HasTokenizer(Protocol):
    """Capability ``tokenizer``: the Hugging Face tokenizer the task tokenises with."""

    tokenizer: Any


#: optional capabilities: name -> (what it is, what needs it)
CAPABILITIES: dict[str, tuple[str, str]] = {
    "predictions": ("predictions(logits, batch) -> Int[B] (class index, compared with batch.labels)",
                    "predict(), evaluate() without correct(), the report's prediction"),
    "option_logits": ("option_logits(logits, batch) -> Float[B, n_options] (with batch.labels)",
                      "the SAE layer sweep and the necessity/sufficiency ablations"),
    "correct": ("correct(logits, batch) -> Bool[B]", "evaluate() and finetuning's evaluation"),
    "encode": ("encode(example) -> list[int] (the whole input sequence)", "finetuning's max_length filter"),
    "tokenizer": ("a `tokenizer` attribute (Hugging Face tokenizer)",
                  "decoding tokens in results, heatmaps and reports; cache fingerprints"),
}  # fmt: skip


def supports(task: Any, capability: str) -> bool:
    """Whether ``task`` has the optional ``capability`` (a key of :data:`CAPABILITIES`)."""
    if capability not in CAPABILITIES:
        raise ValueError(f"Unknown task capability {capability!r}; known: {sorted(CAPABILITIES)}.")
    value = getattr(task, capability, None)
    return value is not None if capability == "tokenizer" else callable(value)


def require(task: Any, capability: str, *, needed_by: str) -> Any:
    """Return ``task`` when it has ``capability``, else raise :class:`MissingCapabilityError` naming it."""
    if supports(task, capability):
        return task
    what, _ = CAPABILITIES[capability]
    has = [c for c in CAPABILITIES if supports(task, c)]
    raise MissingCapabilityError(
        f"{needed_by} needs the task capability {capability!r} ({what}), which {type(task).__name__} does not "
        f"have (its optional capabilities: {has or 'none'}). Fix: use a task that implements it (e.g. "
        "MultipleChoiceTask for option_logits / predictions), or add the method to your task "
        "(see repinf_lens.task.Task)."
    )


class Task(ABC):
    """The contract of a task: the user's problem in one small object.

    Required (abstract):

    * :meth:`collate`: examples -> a right-padded :class:`TaskBatch`.
    * :meth:`loss`: loss-position logits -> loss, with an explicit reduction.

    Provided (override when needed): :meth:`loss_vocab` (default ``None``: all columns), :meth:`answer_logits`,
    :meth:`model_logits`, :meth:`config`.

    Optional capabilities (:data:`CAPABILITIES`; check with :func:`supports`, and functions that need one call
    :func:`require`, which raises :class:`MissingCapabilityError` naming it): ``predictions``
    (:class:`SupportsPredictions`), ``option_logits`` (:class:`SupportsOptionLogits`), ``correct``
    (:class:`SupportsCorrect`), ``encode`` (:class:`SupportsEncode`), ``tokenizer`` (:class:`HasTokenizer`).

    Sign convention: the loss is what training minimises; a POSITIVE influence score marks a proponent
    (up-weighting the training example lowers the test loss).
    """

    @abstractmethod
    def collate(self, examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> Any:
        """Tokenise and right-pad examples (a list of dicts, or a dataset slice of columns) into a :class:`TaskBatch`.

        Raise a clear ``ValueError`` for a malformed example, naming its ``id`` and the fix.
        """

    @abstractmethod
    def loss(self, logits: Tensor, batch: Any, reduction: str = "mean") -> Tensor:
        """The loss of each example from its loss-position logits.

        Args:
            logits: ``[B, V]`` when ``batch.answer_pos`` is ``[B]``, ``[B, P, V]`` when it is ``[B, P]`` (what
                :meth:`~repinf_lens.split.SplitModel.logits` and :meth:`model_logits` return). Implementations
                may also accept full ``[B, T, V]`` logits via :meth:`answer_logits`. ``V`` is the full vocabulary
                even with a trimmed unembedding (the kept columns are recomputed from theta2).
            batch: the batch :meth:`collate` returned (on the logits' device or movable there).
            reduction: ``"none"`` -> ``[B]`` per-example losses; ``"mean"`` (default; what curvature and
                influence use) or ``"sum"`` over the examples -> a scalar.

        Must be differentiable (``torch.func.grad`` / ``jvp`` / ``vmap``) in ``logits``, and each example's loss
        must depend on its own logits only (the derivative swap sums per-example losses).
        """

    def loss_vocab(self) -> list[int] | None:
        """The token ids whose answer-position logits :meth:`loss` reads, or ``None`` for (possibly) all of them.

        When a task returns ids here, :class:`~repinf_lens.split.SplitModel` restricts theta2's unembedding to
        those columns: every other column has exactly zero gradient, Hessian block and s_test entries, so
        influence is unchanged and theta2 shrinks by ``(d_vocab - len(ids)) * d_model`` parameters.
        """
        return None

    def answer_logits(self, logits: Tensor, batch: Any) -> Tensor:
        """Logits at ``batch.answer_pos`` (full vocabulary): ``[B, V]`` or ``[B, P, V]``.

        ``logits`` may be full ``[B, T, V]`` logits (gathered here) or already at the loss positions (returned
        as they are; with ``answer_pos [B, P]`` a ``[B, P, V]`` tensor counts as already gathered).
        """
        pos = batch.answer_pos
        if logits.ndim == pos.ndim + 1 and (pos.ndim == 1 or logits.shape[1] == pos.shape[1]):
            return logits
        return gather_positions(logits, pos)

    def model_logits(self, model: Any, batch: Any) -> Tensor:
        """Run a ``HookedTransformer`` on ``batch`` and unembed only the loss positions (``[B, V]`` / ``[B, P, V]``).

        Full logits at every position cost ``B x T x d_vocab`` memory (49k vocabulary for the default model);
        only the answer positions are needed, so the residual stream is gathered there first.
        """
        from repinf_lens.models.hooked import final_logits

        tokens = batch.tokens.to(model.cfg.device)
        check_fits(model, tokens)
        resid = gather_positions(model(tokens, stop_at_layer=model.cfg.n_layers), batch.answer_pos)
        if resid.ndim == 2:
            return final_logits(model, resid[:, None, :])[:, 0, :]
        return final_logits(model, resid)

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable settings of the task, recorded next to results and part of cache fingerprints.

        Default: every public and private attribute that is a str, number, bool, None or a list/tuple of them
        (template, letters, max_length, ...). Override when a setting that changes the loss is held otherwise.
        """
        return _vars_config(self)


def check_fits(model: Any, tokens: Tensor) -> None:
    """Raise :class:`PromptTooLongError` when ``tokens`` is longer than the model's ``n_ctx``."""
    n_ctx = int(model.cfg.n_ctx)
    if tokens.shape[-1] > n_ctx:
        raise PromptTooLongError(
            f"A batch has sequences of {tokens.shape[-1]} tokens but the model's context is n_ctx={n_ctx}. "
            f"Fix: load the model with a larger context (load_model(..., n_ctx={tokens.shape[-1]})), or set "
            "max_length on the task to drop or shorten long examples."
        )


_B = TypeVar("_B", bound="TaskBatchMixin")


class TaskBatchMixin:
    """``to(device)`` and ``len`` for the dataclass batches below (every tensor field moves; the rest is kept)."""

    tokens: Tensor

    def to(self: _B, device: str | torch.device) -> _B:
        """Move every tensor to ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]  # subclasses are dataclasses
        return type(self)(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()})

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def task_config(task: Any) -> dict[str, Any]:
    """The JSON-serialisable settings of a task (template, letters, max_length, ...), recorded next to results.

    ``task.config()`` when the task has it (every :class:`Task`), else its plain attributes (duck-typed tasks).
    """
    cfg = getattr(task, "config", None)
    return dict(cfg()) if callable(cfg) else _vars_config(task)


def _vars_config(task: Any) -> dict[str, Any]:
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in sorted(vars(task).items())
        if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
    }
