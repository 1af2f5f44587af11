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
import numbers
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens._io import as_rows as as_rows
from repinf_lens._io import is_example as is_example
from repinf_lens.errors import RepinfLensError

__all__ = [
    "Task",
    "TaskBatch",
    "CAPABILITIES",
    "MissingCapabilityError",
    "SupportsPredictions",
    "SupportsOptionLogits",
    "SupportsCorrect",
    "SupportsEncode",
    "HasTokenizer",
    "supports",
    "require",
    "check_batch",
    "is_example",
    "gather_positions",
    "MCQABatch",
    "MultipleChoiceTask",
    "CompletionBatch",
    "CompletionTask",
    "mcqa_to_completion",
    "PromptTooLongError",
    "evaluate",
    "predict",
    "parse_option",
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
        from repinf_lens.hooked import final_logits

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


_LETTERS = "ABCDEFGHIJ"
_PLAIN_TEMPLATE = "{question}\n{options}\nAnswer:"
_INSTRUCTION = "Answer with the letter of the correct option only."


_B = TypeVar("_B", bound="_BatchMethods")


class _BatchMethods:
    """``to(device)`` and ``len`` for the dataclass batches below (every tensor field moves; the rest is kept)."""

    tokens: Tensor

    def to(self: _B, device: str | torch.device) -> _B:
        """Move every tensor to ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]  # subclasses are dataclasses
        return type(self)(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()})

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class MCQABatch(_BatchMethods):
    """A right-padded batch of multiple-choice prompts.

    Attributes:
        tokens: ``[B, T]`` token ids (padding with the tokenizer's pad id).
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for padding.
        answer_pos: ``[B]`` position whose next-token logits choose the answer (the last prompt token).
        labels: ``[B]`` index of the correct option (into ``option_ids``).
        option_ids: ``[B, K]`` token id of each option letter (``-1`` where an example has fewer options).
        ids: the examples' ``id`` strings.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, " batch"]
    labels: Int[Tensor, " batch"]
    option_ids: Int[Tensor, "batch n_options"]
    ids: list[str] = field(default_factory=list)

    @property
    def option_mask(self) -> Tensor:
        """``[B, K]`` True where the option exists."""
        return self.option_ids >= 0

    @property
    def target_ids(self) -> Int[Tensor, " batch"]:
        """``[B]`` vocabulary id of each example's correct option letter."""
        return self.option_ids.gather(1, self.labels[:, None])[:, 0]


class MultipleChoiceTask(Task):
    """Multiple-choice QA scored by the option letters' logits at the answer position (the paper's task).

    Args:
        tokenizer: a Hugging Face tokenizer (``model.tokenizer`` of a HookedTransformer).
        template: ``"chat"`` (the tokenizer's chat template, default when it has one), ``"plain"``
            (``Question ... A. ... Answer:``), or a format string with ``{question}`` and ``{options}``.
        letters: option letters, in order (default ``"ABCDEFGHIJ"``; the datasets use A-E).
        full_vocab: when True, :meth:`loss` is the cross-entropy over the whole vocabulary with the correct
            letter as target; by default it is the cross-entropy over the example's option letters only.
        max_length: longest allowed prompt in tokens (``None``: no limit here; the model's n_ctx is checked at
            forward time). Longer prompts raise :class:`PromptTooLongError` naming the example.
        instruction: text appended after the options in the user message.
        system_prompt: optional system message for the chat template (``None``: the template's default).
        prepend_bos: whether non-chat prompts start with the tokenizer's BOS token (``None``: its
            ``add_bos_token`` decides; :meth:`from_model` uses the model's ``default_prepend_bos``).

    The answer position is the last prompt token: with the chat template the prompt ends in the assistant
    header, and the letter follows without a space; with the plain template it ends in ``Answer:`` and the
    letter follows after a space.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        template: str | None = None,
        letters: str = _LETTERS,
        full_vocab: bool = False,
        max_length: int | None = None,
        instruction: str = _INSTRUCTION,
        system_prompt: str | None = None,
        prepend_bos: bool | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.prepend_bos = prepend_bos
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template is None:
            template = "chat" if has_chat else "plain"
        if template == "chat" and not has_chat:
            raise ValueError("template='chat' but the tokenizer has no chat template. Fix: use template='plain'.")
        if template not in ("chat", "plain") and ("{question}" not in template or "{options}" not in template):
            raise ValueError(
                f"Unknown template {template!r}. Fix: use 'chat', 'plain', or a format string "
                "containing '{question}' and '{options}'."
            )
        self.template = template
        self.letters = letters
        self.full_vocab = full_vocab
        self.max_length = max_length
        self.instruction = instruction
        self.system_prompt = system_prompt
        prefix = "" if template == "chat" else " "
        ids = []
        for letter in letters:
            enc = tokenizer.encode(prefix + letter, add_special_tokens=False)
            if len(enc) != 1:
                raise ValueError(
                    f"Option letter {prefix + letter!r} is {len(enc)} tokens for this tokenizer; "
                    "the task needs one token per letter. Fix: choose other `letters`."
                )
            ids.append(enc[0])
        self.letter_ids: list[int] = ids
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> MultipleChoiceTask:
        """Build the task from a HookedTransformer's tokenizer, with ``max_length = model.cfg.n_ctx`` and the
        model's own BOS policy (``prepend_bos = model.cfg.default_prepend_bos``: TransformerLens' tokenizer copy
        always has ``add_bos_token=True``, which would otherwise prepend a BOS the model was not used with)."""
        kwargs.setdefault("max_length", int(model.cfg.n_ctx))
        kwargs.setdefault("prepend_bos", bool(getattr(model.cfg, "default_prepend_bos", True)))
        return cls(model.tokenizer, **kwargs)

    def config(self) -> dict[str, Any]:
        """As :meth:`Task.config`; ``prepend_bos`` only when set explicitly (``None``: the tokenizer decides)."""
        cfg = super().config()
        if cfg.get("prepend_bos") is None:
            cfg.pop("prepend_bos", None)
        return cfg

    # ----------------------------------------------------------------- formatting
    def format_options(self, choices: Sequence[str]) -> str:
        return "\n".join(f"{self.letters[i]}. {c}" for i, c in enumerate(choices))

    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The prompt text (no answer) of one example ``{question, choices, ...}``."""
        options = self.format_options(example["choices"])
        if self.template == "chat":
            content = f"{example['question']}\n{options}"
            if self.instruction:
                content += f"\n{self.instruction}"
            messages = [{"role": "user", "content": content}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        fmt = _PLAIN_TEMPLATE if self.template == "plain" else self.template
        return fmt.format(question=example["question"], options=options)

    def answer_text(self, example: Mapping[str, Any]) -> str:
        """The target completion of an example (``"B"`` for chat, ``" B"`` for plain templates)."""
        letter = self.letters[int(example["answer"])]
        return letter if self.template == "chat" else " " + letter

    def encode(self, example: Mapping[str, Any]) -> list[int]:
        """Token ids of the prompt of one example, checked against ``max_length``."""
        ids = self.tokenizer(self.format_prompt(example), add_special_tokens=False)["input_ids"]
        bos = getattr(self.tokenizer, "add_bos_token", False) if self.prepend_bos is None else self.prepend_bos
        if self.template != "chat" and self.tokenizer.bos_token_id is not None and bos:
            ids = [self.tokenizer.bos_token_id, *ids]
        if self.max_length is not None and len(ids) > self.max_length:
            raise PromptTooLongError(
                f"Example {example.get('id', '?')!r} is {len(ids)} tokens long, more than max_length="
                f"{self.max_length} (the model's n_ctx). Fix: load the model with a larger n_ctx, or filter "
                "long examples out first (e.g. dataset.filter(lambda ex: len(task.encode(ex)) <= n))."
            )
        return ids

    def validate(self, example: Mapping[str, Any]) -> None:
        """Raise a clear ``ValueError`` when an example is malformed for this task."""
        ex_id = example.get("id", "?")
        for key in ("question", "choices", "answer"):
            if key not in example:
                raise ValueError(
                    f"Example {ex_id!r} has no {key!r} field (fields: {sorted(example)}). Fix: give "
                    "every example 'question' (str), 'choices' (list[str]) and 'answer' (int index)."
                )
        choices = example["choices"]
        if not isinstance(choices, (list, tuple)) or len(choices) < 2:
            raise ValueError(f"Example {ex_id!r}: 'choices' must be a list of at least 2 strings, got {choices!r}.")
        if len(choices) > len(self.letters):
            raise ValueError(
                f"Example {ex_id!r} has {len(choices)} options but the task has only "
                f"{len(self.letters)} letters ({self.letters}). Fix: pass more `letters`."
            )
        answer = example["answer"]
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= int(answer) < len(choices):
            raise ValueError(
                f"Example {ex_id!r}: label {answer!r} is outside the {len(choices)} options "
                f"(valid: 0..{len(choices) - 1}). Fix: 'answer' must be the 0-based index of the "
                "correct choice (convert letters with 'ABCDE'.index(letter))."
            )

    # ----------------------------------------------------------------- batching
    def collate(self, examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> MCQABatch:
        """Tokenise, validate and right-pad examples (a list of dicts, or a dataset slice of columns)."""
        rows = as_rows(examples)
        if not rows:
            raise ValueError("collate() got no examples. Fix: pass a non-empty list or dataset slice.")
        for ex in rows:
            self.validate(ex)
        encoded = [self.encode(ex) for ex in rows]
        width = max(len(e) for e in encoded)
        n_opt = max(len(ex["choices"]) for ex in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        option_ids = torch.full((len(rows), n_opt), -1, dtype=torch.long)
        for i, (ex, ids) in enumerate(zip(rows, encoded)):
            tokens[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            option_ids[i, : len(ex["choices"])] = torch.tensor(self.letter_ids[: len(ex["choices"])])
        return MCQABatch(
            tokens=tokens,
            attention_mask=mask,
            answer_pos=torch.tensor([len(e) - 1 for e in encoded], dtype=torch.long),
            labels=torch.tensor([int(ex["answer"]) for ex in rows], dtype=torch.long),
            option_ids=option_ids,
            ids=[str(ex.get("id", i)) for i, ex in enumerate(rows)],
        )

    def loss_vocab(self) -> list[int] | None:
        """The option letters' token ids (the only logits the loss reads), ``None`` with ``full_vocab=True``."""
        return None if self.full_vocab else sorted(set(self.letter_ids))

    # ----------------------------------------------------------------- scoring
    def option_logits(self, logits: Tensor, batch: MCQABatch) -> Float[Tensor, "batch n_options"]:
        """Logits of each option letter (``-inf`` for options an example does not have)."""
        ans = self.answer_logits(logits, batch)
        opt = batch.option_ids.to(ans.device)
        out = ans.gather(1, opt.clamp_min(0))
        return out.masked_fill(opt < 0, float("-inf"))

    def loss(self, logits: Tensor, batch: MCQABatch, reduction: str = "mean") -> Tensor:
        """Cross-entropy of the correct option at the answer position.

        Over the option letters (default) or over the full vocabulary (``full_vocab=True``). ``logits`` may be
        ``[B, T, V]`` or answer-position logits ``[B, V]``. ``reduction``: ``"mean"`` (default), ``"sum"``,
        ``"none"``.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if self.full_vocab:
            ans = self.answer_logits(logits, batch)
            return F.cross_entropy(ans, batch.target_ids.to(ans.device), reduction=reduction)
        opt = self.option_logits(logits, batch)
        return F.cross_entropy(opt, batch.labels.to(opt.device), reduction=reduction)

    def predictions(self, logits: Tensor, batch: MCQABatch) -> Int[Tensor, " batch"]:
        """Index of the option whose letter has the largest logit."""
        return self.option_logits(logits, batch).argmax(-1)

    def correct(self, logits: Tensor, batch: MCQABatch) -> Bool[Tensor, " batch"]:
        """``[B]`` True where the predicted option is the key (``predictions == labels``)."""
        return self.predictions(logits, batch) == batch.labels.to(logits.device)


# ---------------------------------------------------------------------------------------------------- completion
@dataclass
class CompletionBatch(_BatchMethods):
    """A right-padded batch of prompt + target sequences (the batch of :class:`CompletionTask`).

    Attributes:
        tokens: ``[B, T]`` prompt tokens then target tokens, then padding (the tokenizer's pad id).
        attention_mask: ``[B, T]`` 1 for real (prompt and target) tokens, 0 for padding.
        answer_pos: ``[B, P]`` the positions whose next-token logits predict the target tokens
            (``prompt_len - 1 + p`` for target token ``p``; ``P`` = the longest target of the batch; entries past
            an example's target repeat a valid position and are masked by ``target_mask``).
        target_ids: ``[B, P]`` the target tokens (the pad id where masked).
        target_mask: ``[B, P]`` True for real target tokens.
        prompt_len: ``[B]`` number of prompt tokens (BOS and template included).
        ids: the examples' ``id`` strings.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    answer_pos: Int[Tensor, "batch n_target"]
    target_ids: Int[Tensor, "batch n_target"]
    target_mask: Bool[Tensor, "batch n_target"]
    prompt_len: Int[Tensor, " batch"]
    ids: list[str] = field(default_factory=list)

    @property
    def target_token_mask(self) -> Bool[Tensor, "batch pos"]:
        """``[B, T]`` True at the positions of the target tokens in ``tokens``."""
        t = torch.arange(self.tokens.shape[1], device=self.tokens.device)[None]
        start = self.prompt_len.to(t.device)[:, None]
        return (t >= start) & (t < start + self.target_mask.sum(1).to(t.device)[:, None])


class CompletionTask(Task):
    """Prompt -> target text; the loss is the mean negative log-likelihood of the target tokens.

    Each example is a mapping with a prompt and a target string (fields ``prompt_field`` / ``target_field``).
    :meth:`collate` tokenises the prompt (through ``template``) and the target separately and concatenates them
    (the boundary is exact, as in supervised finetuning); the loss of an example is the mean over ITS target
    tokens of ``-log p(target token | everything before it)`` (prompt and padding masked out), so examples with
    long and short targets weigh the same in the batch mean.

    Args:
        tokenizer: a Hugging Face tokenizer (``model.tokenizer`` of a HookedTransformer).
        max_length: longest allowed prompt + target in tokens (``None``: no limit here; the model's n_ctx is
            checked at forward time). Longer examples raise :class:`PromptTooLongError` naming the example.
        prompt_field: the field holding the prompt text.
        target_field: the field holding the target text (non-empty; include a leading space yourself when the
            target follows a plain-text prompt such as ``"...Answer:"``).
        template: ``None`` (the prompt text as it is), ``"chat"`` (the prompt as the user message of the
            tokenizer's chat template with the assistant header appended; the target is the reply), or a format
            string filled from the example's fields, with ``{prompt}`` = the prompt field (e.g.
            ``"Question: {prompt}\\nAnswer:"``).
        append_eos: append the tokenizer's EOS token to every target (it is then part of the loss).
        system_prompt: optional system message for the chat template.

    Capabilities: ``correct`` (teacher-forced exact match: every target token is the arg-max, which is exactly
    "greedy decoding reproduces the target"), ``encode``, ``tokenizer``; no ``predictions`` / ``option_logits``
    (not a classification task), so the SAE layer sweep and the necessity/sufficiency ablations refuse it.
    Sign convention: POSITIVE influence = proponent (up-weighting the training example lowers the target NLL).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int | None = None,
        prompt_field: str = "prompt",
        target_field: str = "target",
        template: str | None = None,
        append_eos: bool = False,
        system_prompt: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' but the tokenizer has no chat template. Fix: use template=None.")
        if template not in (None, "chat") and "{" not in template:
            raise ValueError(
                f"Unknown template {template!r}. Fix: use None (the prompt as it is), 'chat', or a format string "
                "such as 'Question: {prompt}\\nAnswer:'."
            )
        if append_eos and tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no eos_token_id. Fix: append_eos=False.")
        self.template = template
        self.max_length = max_length
        self.prompt_field = prompt_field
        self.target_field = target_field
        self.append_eos = append_eos
        self.system_prompt = system_prompt
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> CompletionTask:
        """Build the task from a HookedTransformer's tokenizer, with ``max_length = model.cfg.n_ctx``."""
        kwargs.setdefault("max_length", int(model.cfg.n_ctx))
        return cls(model.tokenizer, **kwargs)

    # ----------------------------------------------------------------- formatting
    def format_prompt(self, example: Mapping[str, Any]) -> str:
        """The prompt text of one example, through the template."""
        prompt = str(example[self.prompt_field])
        if self.template is None:
            return prompt
        if self.template == "chat":
            messages = [{"role": "user", "content": prompt}]
            if self.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        try:
            return self.template.format_map({**example, "prompt": prompt})
        except (KeyError, IndexError) as err:
            raise ValueError(
                f"Example {example.get('id', '?')!r}: the template {self.template!r} needs the field {err} "
                f"(fields: {sorted(example)}). Fix: use '{{prompt}}' or fields every example has."
            ) from None

    def encode_parts(self, example: Mapping[str, Any]) -> tuple[list[int], list[int]]:
        """``(prompt ids, target ids)`` of one example, checked against ``max_length``."""
        tok = self.tokenizer
        prompt = tok(self.format_prompt(example), add_special_tokens=False)["input_ids"]
        if self.template != "chat" and tok.bos_token_id is not None and getattr(tok, "add_bos_token", False):
            prompt = [tok.bos_token_id, *prompt]
        target = tok(str(example[self.target_field]), add_special_tokens=False)["input_ids"]
        if self.append_eos:
            target = [*target, int(tok.eos_token_id)]
        ex_id = example.get("id", "?")
        if not prompt:
            raise ValueError(
                f"Example {ex_id!r} has an empty prompt: the first target token would have no position to be "
                f"predicted from. Fix: give every example a non-empty {self.prompt_field!r} (or a template)."
            )
        if not target:
            raise ValueError(f"Example {ex_id!r}: the target tokenises to no tokens. Fix: a non-empty target text.")
        if self.max_length is not None and len(prompt) + len(target) > self.max_length:
            raise PromptTooLongError(
                f"Example {ex_id!r} is {len(prompt)} prompt + {len(target)} target tokens, more than max_length="
                f"{self.max_length} (the model's n_ctx). Fix: load the model with a larger n_ctx, or filter long "
                "examples out first (e.g. dataset.filter(lambda ex: len(task.encode(ex)) <= n))."
            )
        return prompt, target

    def encode(self, example: Mapping[str, Any]) -> list[int]:
        """Token ids of prompt + target of one example (the whole sequence the model reads)."""
        prompt, target = self.encode_parts(example)
        return [*prompt, *target]

    def validate(self, example: Mapping[str, Any]) -> None:
        """Raise a clear ``ValueError`` when an example is malformed for this task."""
        ex_id = example.get("id", "?")
        for key in (self.prompt_field, self.target_field):
            if key not in example:
                raise ValueError(
                    f"Example {ex_id!r} has no {key!r} field (fields: {sorted(example)}). Fix: give every example "
                    f"{self.prompt_field!r} and {self.target_field!r} strings (mcqa_to_completion converts "
                    "multiple-choice rows), or pass prompt_field= / target_field=."
                )
            if not isinstance(example[key], str):
                raise ValueError(
                    f"Example {ex_id!r}: {key!r} is a {type(example[key]).__name__}, not a string. Fix: a text."
                )
        if not example[self.target_field]:
            raise ValueError(f"Example {ex_id!r}: {self.target_field!r} is empty. Fix: a non-empty target text.")

    # ----------------------------------------------------------------- batching
    def collate(self, examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> CompletionBatch:
        """Tokenise, validate and right-pad examples (a list of dicts, or a dataset slice of columns)."""
        rows = as_rows(examples)
        if not rows:
            raise ValueError("collate() got no examples. Fix: pass a non-empty list or dataset slice.")
        for ex in rows:
            self.validate(ex)
        parts = [self.encode_parts(ex) for ex in rows]
        width = max(len(p) + len(t) for p, t in parts)
        n_tgt = max(len(t) for _, t in parts)
        b = len(rows)
        tokens = torch.full((b, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        answer_pos = torch.zeros((b, n_tgt), dtype=torch.long)
        target_ids = torch.full((b, n_tgt), self.pad_id, dtype=torch.long)
        target_mask = torch.zeros((b, n_tgt), dtype=torch.bool)
        for i, (prompt, target) in enumerate(parts):
            seq = [*prompt, *target]
            tokens[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            n = len(target)
            pos = torch.arange(n_tgt) + len(prompt) - 1
            answer_pos[i] = pos.clamp_max(len(seq) - 2)  # past the target: the last predicting position
            target_ids[i, :n] = torch.tensor(target)
            target_mask[i, :n] = True
        return CompletionBatch(
            tokens=tokens,
            attention_mask=mask,
            answer_pos=answer_pos,
            target_ids=target_ids,
            target_mask=target_mask,
            prompt_len=torch.tensor([len(p) for p, _ in parts], dtype=torch.long),
            ids=[str(ex.get("id", i)) for i, ex in enumerate(rows)],
        )

    # ----------------------------------------------------------------- scoring
    def token_nll(self, logits: Tensor, batch: CompletionBatch) -> Float[Tensor, "batch n_target"]:
        """``[B, P]`` ``-log p(target token)`` at each target position (0 where ``target_mask`` is False)."""
        lg = self.answer_logits(logits, batch)
        tgt = batch.target_ids.to(lg.device)
        keep = batch.target_mask.to(lg.device)
        nll = F.cross_entropy(lg.flatten(0, 1), tgt.flatten(), reduction="none").view(tgt.shape)
        return torch.where(keep, nll, torch.zeros_like(nll))

    def loss(self, logits: Tensor, batch: CompletionBatch, reduction: str = "mean") -> Tensor:
        """Mean NLL of each example's target tokens; reduced over the examples by ``reduction``.

        ``logits``: ``[B, P, V]`` at ``batch.answer_pos`` (what the split and :meth:`model_logits` return) or the
        full ``[B, T, V]``. ``reduction``: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[B]``).
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        nll = self.token_nll(logits, batch)
        per = nll.sum(1) / batch.target_mask.to(nll.device).sum(1).to(nll.dtype)
        return per if reduction == "none" else per.sum() if reduction == "sum" else per.mean()

    def token_accuracy(self, logits: Tensor, batch: CompletionBatch) -> Float[Tensor, " batch"]:
        """``[B]`` share of target tokens that are the arg-max given the true prefix (teacher forcing)."""
        lg = self.answer_logits(logits, batch)
        keep = batch.target_mask.to(lg.device)
        hit = (lg.argmax(-1) == batch.target_ids.to(lg.device)) & keep
        return hit.sum(1).float() / keep.sum(1).float()

    def correct(self, logits: Tensor, batch: CompletionBatch) -> Bool[Tensor, " batch"]:
        """``[B]`` True when every target token is the arg-max given the true prefix (= greedy decoding gives it)."""
        return self.token_accuracy(logits, batch) == 1.0


def mcqa_to_completion(
    rows: Any,
    *,
    target: str = "text",
    options: bool = True,
    letters: str = _LETTERS,
    prompt_suffix: str = "\nAnswer:",
    target_prefix: str = " ",
) -> list[dict[str, Any]]:
    """Multiple-choice rows ``{id, question, choices, answer}`` -> completion rows ``{id, prompt, target}``.

    The prompt is the question, then (``options=True``) one ``"A. choice"`` line per option, then
    ``prompt_suffix``; the target is ``target_prefix`` + the answer: its text (``target="text"``, e.g. MedQA's
    answer text), its letter (``"letter"``) or both (``"letter_text"``: ``"B. four"``). For
    ``CompletionTask(template="chat")`` pass ``prompt_suffix=""`` and ``target_prefix=""``.
    """
    if target not in ("text", "letter", "letter_text"):
        raise ValueError(f"target must be 'text', 'letter' or 'letter_text', got {target!r}.")
    out = []
    for i, row in enumerate(as_rows(rows)):
        choices, answer = list(row["choices"]), int(row["answer"])
        if not 0 <= answer < len(choices) or len(choices) > len(letters):
            raise ValueError(
                f"Row {row.get('id', i)!r}: answer {answer} is outside its {len(choices)} options (or there are "
                f"more options than letters {letters!r}). Fix: 'answer' is the 0-based index of the right choice."
            )
        prompt = str(row["question"])
        if options:
            prompt += "\n" + "\n".join(f"{letters[j]}. {c}" for j, c in enumerate(choices))
        text = {"text": str(choices[answer]), "letter": letters[answer],
                "letter_text": f"{letters[answer]}. {choices[answer]}"}[target]  # fmt: skip
        out.append({"id": str(row.get("id", i)), "prompt": prompt + prompt_suffix, "target": target_prefix + text})
    return out


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


_PARSE_PATTERNS = [
    r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\s*([{L}])\b",
    r"^\s*\(?([{L}])\)?\s*(?:[.):\]]|$)",
    r"\boption\s*\(?([{L}])\b",
    r"\(([{L}])\)",
]


def parse_option(text: str, n_options: int = 5, letters: str = _LETTERS) -> int | None:
    """Deterministically parse the chosen option (0-based) from generated text, ``None`` if there is none.

    Tried in order: ``"answer is B"`` / ``"Answer: B"``, a leading letter (``"B"``, ``"B."``, ``"(B)"``,
    ``"B)"``), ``"option B"``, a parenthesised letter anywhere. Only the first ``n_options`` letters count.
    """
    allowed = re.escape(letters[:n_options])
    for pat in _PARSE_PATTERNS:
        m = re.search(pat.replace("{L}", allowed), text, flags=re.IGNORECASE | re.MULTILINE)
        if m:
            letter = m.group(1).upper()
            if letter in letters[:n_options]:
                return letters.index(letter)
    return None


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
