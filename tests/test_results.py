"""The results file at its edges: write failures, resuming across dtypes and devices, odd characters."""

from __future__ import annotations

import json
import os

import pytest

from pipeinfer import report
from pipeinfer.results import ResultsError, ResultsWriter, prompt_hash, scan_previous

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


def test_resume_false_with_an_unmovable_file(tmp_path):
    out = tmp_path / "run.jsonl"
    write_lines(out, {"type": "run", "config": CONFIG})
    (tmp_path / "run.jsonl.bak").mkdir()
    with pytest.raises(ResultsError, match="cannot be moved to .*run.jsonl.bak .*move or delete"):
        scan_previous(str(out), CONFIG, ["a"], False)
    assert out.exists(), "the file stays where it was"


def test_report_reads_records_with_raw_line_separators(tmp_path):
    out = tmp_path / "run.jsonl"
    text = "a\u2028b\u2029c\x85d"  # written raw by ensure_ascii=False; not line ends in JSONL
    write_lines(out, {"type": "run", "config": CONFIG}, {"type": "prompt", "prompt_index": 0, "output_text": text})
    records, torn = report.read_records(str(out))
    assert not torn and [r["type"] for r in records] == ["run", "prompt"] and records[1]["output_text"] == text
