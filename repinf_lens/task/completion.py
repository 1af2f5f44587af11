"""A task that is not multiple choice: prompt -> target text, loss = mean NLL of the target tokens.

:class:`CompletionTask` (MedQA's answer text, instruction data, ...) has several loss positions per example;
:func:`mcqa_to_completion` turns multiple-choice rows into completion rows. Sign convention: the loss is
minimised; POSITIVE influence = proponent.
"""

from __future__ import annotations

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
from repinf_lens.task.mcqa import LETTERS

__all__ = ["CompletionBatch", "CompletionTask", "mcqa_to_completion"]


@dataclass
class CompletionBatch(TaskBatchMixin):
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
    letters: str = LETTERS,
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
