"""The paper's task: multiple-choice QA scored by the option letters' logits at the answer position.

:class:`MultipleChoiceTask` formats a question and its options through a template (``"plain"``, ``"chat"`` or a
format string), reads the logits of the option letters at ONE position (after ``Answer:`` or the assistant turn)
and attributes the cross-entropy over those letters. :func:`parse_option` reads a chosen letter out of generated
text. Sign convention: the loss is minimised; POSITIVE influence = proponent.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from repinf_lens._io import as_rows as as_rows
from repinf_lens._io import is_example as is_example
from repinf_lens.task.base import PromptTooLongError, Task, TaskBatchMixin

__all__ = ["LETTERS", "MCQABatch", "MultipleChoiceTask", "parse_option"]

LETTERS = "ABCDEFGHIJ"
"""The option letters, in order (the first ``n_options`` are used)."""
_PLAIN_TEMPLATE = "{question}\n{options}\nAnswer:"
_INSTRUCTION = "Answer with the letter of the correct option only."


@dataclass
class MCQABatch(TaskBatchMixin):
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
        letters: str = LETTERS,
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


_PARSE_PATTERNS = [
    r"answer\s*(?:is|:)?\s*[:\-]?\s*\(?\s*([{L}])\b",
    r"^\s*\(?([{L}])\)?\s*(?:[.):\]]|$)",
    r"\boption\s*\(?([{L}])\b",
    r"\(([{L}])\)",
]


def parse_option(text: str, n_options: int = 5, letters: str = LETTERS) -> int | None:
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
