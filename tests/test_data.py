"""livethinking.data: strict JSONL loading and atomic writing of the livestream records."""

import json

import pytest

from livethinking.data import (DataError, LivestreamRecord, TeacherSample, Turn, load_records,
                               load_teacher_samples, write_jsonl)

GOOD = {"id": "a", "product_doc": "# Product: X\ncolor: red", "question": "What color?",
        "history": [{"role": "user", "content": "hi"}], "reference": "It is red."}


def _write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _with(**changes):
    d = dict(GOOD, **changes)
    return json.dumps({k: v for k, v in d.items() if v is not _DROP})


_DROP = object()


# --- JSONL -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, reason", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (_with(question=_DROP), "missing key 'question'"),
    (_with(history=_DROP), "missing key 'history'"),
    (_with(question=3), "'question' must be a string"),
    (_with(id=""), "'id' must be a non-empty string"),
    (_with(reference=["x"]), "'reference' must be a string or null"),
    (_with(history={"role": "user"}), "'history' must be a list"),
    (_with(history=[{"role": "system", "content": "x"}]), "history[0].role"),
    (_with(history=[{"role": "user", "content": 1}]), "history[0].content"),
    (_with(history=[{"role": "user", "text": "x"}]), "history[0] must have exactly"),
    (_with(questoin="typo"), "unknown key 'questoin'"),
])
def test_bad_record_names_file_and_line(tmp_path, bad, reason):
    path = _write_lines(tmp_path / "r.jsonl", [json.dumps(GOOD), "", bad])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert reason in str(info.value)
    assert (info.value.path, info.value.line) == (str(path), 3)


def test_duplicate_id_and_bad_utf8(tmp_path):
    path = _write_lines(tmp_path / "r.jsonl", [json.dumps(GOOD), json.dumps(GOOD)])
    with pytest.raises(DataError, match=r"r\.jsonl:2: duplicate id 'a' \(first on line 1\)"):
        load_records(path)
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"r\.jsonl:2: not valid UTF-8"):
        load_records(path)


def test_skip_mode_counts_and_keeps_good(tmp_path):
    lines = [json.dumps(GOOD), "{oops", "", _with(id="b", reference=None), _with(id="a"),
             _with(id="c", extra=1), _with(id="d", history=[])]
    result = load_records(_write_lines(tmp_path / "r.jsonl", lines), on_error="skip")
    assert [r.id for r in result.items] == ["a", "b", "d"]
    assert [n for n, _ in result.skipped] == [2, 5, 6]
    assert result.items[1].reference is None
    assert result.items[0].history == [Turn(role="user", content="hi")]


def test_on_error_must_be_known(tmp_path):
    path = _write_lines(tmp_path / "r.jsonl", [json.dumps(GOOD)])
    with pytest.raises(ValueError, match="on_error"):
        load_records(path, on_error="ignore")


def test_teacher_samples(tmp_path):
    lines = [json.dumps({"id": "a", "response": "x"}), json.dumps({"id": "a", "response": ""}),
             json.dumps({"id": "b"}), json.dumps({"id": "b", "response": "y", "score": 1})]
    path = _write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(DataError, match=r"t\.jsonl:3: missing key 'response'"):
        load_teacher_samples(path)
    result = load_teacher_samples(path, on_error="skip")
    assert result.items == [TeacherSample(id="a", response="x"), TeacherSample(id="a", response="")]
    assert [n for n, _ in result.skipped] == [3, 4]


def test_round_trip(tmp_path):
    records = [LivestreamRecord(id="é-1", product_doc="# Product: Tée\ncolor: red",
                                question="Quelle couleur ?",
                                history=[Turn(role="user", content="hi"),
                                         Turn(role="assistant", content="hello")],
                                reference="Rouge."),
               LivestreamRecord(id="2", product_doc="doc", question="q")]
    path = tmp_path / "r.jsonl"
    write_jsonl(path, records)
    assert load_records(path).items == records
    samples = [TeacherSample(id="1", response="<think>a</think> b"), {"id": "2", "response": "c"}]
    write_jsonl(path, samples)
    assert load_teacher_samples(path).items == [samples[0], TeacherSample(id="2", response="c")]
    assert [p.name for p in tmp_path.iterdir()] == ["r.jsonl"]  # no temp files left behind
    with pytest.raises(TypeError, match=r"items\[1\]"):
        write_jsonl(path, [{"id": "x"}, 3])
    assert load_teacher_samples(path).items[1].id == "2"  # the failed write changed nothing
