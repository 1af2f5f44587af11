"""Tasks: how examples become tokens, where the answer is read, and which loss is attributed.

:class:`Task` is the small object a user subclasses (in the spirit of Kronfluence's ``Task``); finetuning, SAE
training, curvature and influence all go through it. :class:`MultipleChoiceTask` is the task of the paper:
multiple-choice QA scored by the logits of the option letters at the answer position.

Batches are right-padded. For a causal model that is exact without an attention mask (real tokens never attend
to later padding), so TransformerLens forwards need no mask; ``attention_mask`` is still provided for Hugging
Face training.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from repinf_lens.errors import RepinfLensError

__all__ = [
    "Task",
    "MCQABatch",
    "MultipleChoiceTask",
    "PromptTooLongError",
    "evaluate",
    "predict",
    "parse_option",
]


class PromptTooLongError(RepinfLensError, ValueError):
    """A formatted prompt does not fit in the model's context (``n_ctx``)."""


@dataclass
class MCQABatch:
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

    def to(self, device: str | torch.device) -> MCQABatch:
        """Move every tensor to ``device``."""
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        return MCQABatch(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()})

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def option_mask(self) -> Tensor:
        """``[B, K]`` True where the option exists."""
        return self.option_ids >= 0

    @property
    def target_ids(self) -> Int[Tensor, " batch"]:
        """``[B]`` vocabulary id of each example's correct option letter."""
        return self.option_ids.gather(1, self.labels[:, None])[:, 0]


class Task:
    """Base class of a task: the user's problem in one small object.

    Subclasses implement :meth:`collate` (examples -> batch with ``tokens`` and ``answer_pos``) and
    :meth:`loss` (answer-position logits -> scalar). The loss reduction is always explicit: ``"mean"`` (the
    default, what curvature and influence use), ``"sum"`` or ``"none"`` (per example).
    """

    def collate(self, examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> Any:
        raise NotImplementedError

    def loss(self, logits: Tensor, batch: Any, reduction: str = "mean") -> Tensor:
        raise NotImplementedError

    def loss_vocab(self) -> list[int] | None:
        """The token ids whose answer-position logits :meth:`loss` reads, or ``None`` for (possibly) all of them.

        When a task returns ids here, :class:`~repinf_lens.split.SplitModel` restricts theta2's unembedding to
        those columns: every other column has exactly zero gradient, Hessian block and s_test entries, so
        influence is unchanged and theta2 shrinks by ``(d_vocab - len(ids)) * d_model`` parameters.
        """
        return None

    def answer_logits(self, logits: Tensor, batch: Any) -> Float[Tensor, "batch d_vocab"]:
        """Full-vocabulary logits at the answer position; ``logits`` may be ``[B, T, V]`` or already ``[B, V]``."""
        if logits.ndim == 2:
            return logits
        idx = batch.answer_pos.to(logits.device)
        return logits[torch.arange(logits.shape[0], device=logits.device), idx]

    def model_logits(self, model: Any, batch: Any) -> Float[Tensor, "batch d_vocab"]:
        """Run a ``HookedTransformer`` on ``batch`` and unembed only the answer position.

        Full logits at every position cost ``B x T x d_vocab`` memory (49k vocabulary for the default model);
        only the answer position is needed, so the residual stream is gathered there first.
        """
        tokens = batch.tokens.to(model.cfg.device)
        check_fits(model, tokens)
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)
        resid = resid[torch.arange(resid.shape[0], device=resid.device), batch.answer_pos.to(resid.device)]
        from repinf_lens.hooked import final_logits

        return final_logits(model, resid[:, None, :])[:, 0, :]


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
    ) -> None:
        self.tokenizer = tokenizer
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
        """Build the task from a HookedTransformer's tokenizer, with ``max_length = model.cfg.n_ctx``."""
        kwargs.setdefault("max_length", int(model.cfg.n_ctx))
        return cls(model.tokenizer, **kwargs)

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
        if (
            self.template != "chat"
            and self.tokenizer.bos_token_id is not None
            and getattr(self.tokenizer, "add_bos_token", False)
        ):
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
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral) or not 0 <= answer < len(choices):
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


def task_config(task: Any) -> dict[str, Any]:
    """The JSON-serialisable settings of a task (template, letters, max_length, ...), recorded next to results."""
    return {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in sorted(vars(task).items())
        if isinstance(v, (str, int, float, bool, list, tuple, type(None)))
    }


def as_rows(examples: Any) -> list[dict[str, Any]]:
    """Examples as a list of dicts: a list of mappings, a ``datasets.Dataset`` or a dict of columns."""
    if isinstance(examples, Mapping):
        keys = list(examples)
        n = len(examples[keys[0]]) if keys else 0
        return [{k: examples[k][i] for k in keys} for i in range(n)]
    return [dict(ex) for ex in examples]


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
    """Predicted and correct option index for every example, batched, with a tqdm bar."""
    if len(dataset) == 0:
        raise ValueError("The dataset is empty. Fix: pass at least one example.")
    preds, labels = [], []
    n_batches = (len(dataset) + batch_size - 1) // batch_size
    for rows in tqdm(_iter_batches(dataset, batch_size), total=n_batches, desc=desc, disable=not progress):
        batch = task.collate(rows)
        logits = task.model_logits(model, batch)
        preds.append(task.predictions(logits, batch).cpu())  # type: ignore[attr-defined]
        labels.append(batch.labels.cpu())
    return torch.cat(preds), torch.cat(labels)


def evaluate(model: Any, task: Task, dataset: Any, *, batch_size: int = 8, progress: bool = True) -> float:
    """Accuracy (0-1) of ``model`` on ``dataset``: the option letter with the largest logit vs the key."""
    preds, labels = predict(model, task, dataset, batch_size=batch_size, progress=progress, desc="evaluate")
    return float((preds == labels).float().mean())
