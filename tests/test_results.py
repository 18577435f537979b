"""The results file at its edges: write failures, resuming across dtypes and devices, odd characters."""

from __future__ import annotations

import json
import os

import pytest

from pipeinfer.report import summary as report
from pipeinfer.record.results import ResultsError, ResultsWriter, keep_backup, prompt_hash, scan_previous

CONFIG = {"model_path": "m", "dtype": "auto", "device": "auto"}


def write_lines(path, *records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to make every write fail")
def test_a_failing_write_is_a_results_error_naming_output_path():
    writer = ResultsWriter("/dev/full")
    try:
        with pytest.raises(ResultsError, match=r"cannot write output_path='/dev/full' \(No space left on device\)"):
            writer.write({"type": "prompt"})
    finally:
        try:
            writer.close()
        except OSError:
            pass  # the buffered line cannot be flushed to /dev/full either


def test_resume_refuses_another_dtype_or_device(tmp_path):
    out = tmp_path / "run.jsonl"
    write_lines(out, {"type": "run", "config": CONFIG, "dtype": "bfloat16", "device": "cuda:0"},
                {"type": "prompt", "prompt_index": 0, "prompt_sha256": prompt_hash("a")})
    assert scan_previous(str(out), CONFIG, ["a", "b"], True, "bfloat16", "cuda").done == {0}  # cuda:1 alike
    for dtype, device in (("float16", "cuda"), ("float32", "cpu")):
        with pytest.raises(ResultsError, match=f"computed in bfloat16 on cuda, but this run resolves .* to {dtype} "
                                               f"on {device}"):
            scan_previous(str(out), CONFIG, ["a", "b"], True, dtype, device)


def test_resume_false_moves_nothing_while_checking(tmp_path):
    out = tmp_path / "run.jsonl"
    write_lines(out, {"type": "run", "config": CONFIG})
    prev = scan_previous(str(out), CONFIG, ["a"], False)
    assert prev.start_over and not prev.done
    assert out.exists() and not (tmp_path / "run.jsonl.bak").exists(), "moved only once every rank has loaded"


def test_backups_are_numbered_and_never_replaced(tmp_path):
    """resume=false used os.replace(path, path + ".bak"): a second start-over lost the first backup."""
    out = tmp_path / "run.jsonl"
    for n in range(3):
        out.write_text(f"attempt {n}\n")
        keep_backup(str(out))
        assert not out.exists()
    assert [(tmp_path / name).read_text() for name in ("run.jsonl.bak", "run.jsonl.bak.1", "run.jsonl.bak.2")] == \
        ["attempt 0\n", "attempt 1\n", "attempt 2\n"]
    (tmp_path / "run.jsonl.bak.3").mkdir()  # whatever holds a name is skipped, never replaced
    out.write_text("attempt 3\n")
    assert keep_backup(str(out)).endswith("run.jsonl.bak.4")


def test_backup_that_cannot_be_made(tmp_path, monkeypatch):
    out = tmp_path / "run.jsonl"
    out.write_text("kept\n")

    def denied(*args):  # a stand-in for a directory this user may not write (root may write any)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "link", denied)
    monkeypatch.setattr(os, "rename", denied)
    with pytest.raises(ResultsError, match=r"cannot be moved to .*run.jsonl.bak \(Permission denied\): move or delete"):
        keep_backup(str(out))
    assert out.read_text() == "kept\n", "the file stays where it was"


def test_resume_with_another_geometry_is_said(tmp_path):
    out = tmp_path / "run.jsonl"
    old = dict(CONFIG, batch_size=4, pipeline_size=2, micro_batch_size="auto")
    write_lines(out, {"type": "run", "config": old, "dtype": "bfloat16", "device": "cpu"},
                {"type": "prompt", "prompt_index": 0, "prompt_sha256": prompt_hash("a")})
    same = scan_previous(str(out), old, ["a", "b"], True, "bfloat16", "cpu")
    assert same.done == {0} and same.geometry == []
    moved = scan_previous(str(out), dict(old, batch_size=2), ["a", "b"], True, "bfloat16", "cpu")
    assert moved.done == {0} and moved.geometry == ["batch_size 4 -> 2"]


def test_report_reads_records_with_raw_line_separators(tmp_path):
    out = tmp_path / "run.jsonl"
    text = "a\u2028b\u2029c\x85d"  # written raw by ensure_ascii=False; not line ends in JSONL
    write_lines(out, {"type": "run", "config": CONFIG}, {"type": "prompt", "prompt_index": 0, "output_text": text})
    records, torn = report.read_records(str(out))
    assert not torn and [r["type"] for r in records] == ["run", "prompt"] and records[1]["output_text"] == text
