"""Parser tests of pipeinfer.slurm on sacct output recorded from the local two-node cluster.

    pytest tests/test_sacct.py

tests/data/sacct/*.txt are `sacct -j JOB -P --noheader --format=<SACCT_FORMAT>` from tests/slurm/cluster.sh
(Slurm 22.05, jobacct_gather/linux), except out_of_memory.handwritten.txt: without cgroups this cluster
kills an over-limit step as CANCELLED (memlimit_kill.txt), never OUT_OF_MEMORY, so that file is written
by hand in the same format, with the 0:125 exit code Slurm gives OOM-killed steps under cgroups.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeinfer.record import sacct as slurm
from pipeinfer.record.results import read_results

DATA = Path(__file__).parent / "data" / "sacct"
REPO = Path(__file__).resolve().parents[1]


def rows_of(name):
    return {(r["step"] or "job"): r for r in slurm.parse_sacct((DATA / name).read_text())}


@pytest.mark.parametrize("text, seconds", [
    ("00:01:02", 62.0), ("1-02:03:04", 93784.0), ("12:34.567", 754.567), ("00:00.016", 0.016),
    ("00:01:12", 72.0), ("", None), ("INVALID", None),
])
def test_parse_duration(text, seconds):
    assert slurm.parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize("text, size", [
    ("1234K", 1234 * 1024), ("5.5M", int(5.5 * 1024**2)), ("2G", 2 * 1024**3), ("0", 0), ("", None),
])
def test_parse_size(text, size):
    assert slurm.parse_size(text) == size


def test_parse_size_rejects_unknown_unit():
    with pytest.raises(ValueError, match="unknown unit 'X'"):
        slurm.parse_size("12X")


def test_completed_two_nodes_has_job_batch_extern_and_srun_step():
    rows = rows_of("completed_2nodes.txt")
    assert list(rows) == ["job", "batch", "extern", "0"]
    assert {r["state"] for r in rows.values()} == {"COMPLETED"}
    assert {r["job_id"] for r in rows.values()} == {"2"}
    job, step = rows["job"], rows["0"]
    assert (job["exit_code"], job["exit_signal"], job["elapsed_s"]) == (0, 0, 3.0)
    assert job["max_rss_bytes"] is None and job["tres_usage_in_max"] == {}   # only steps carry usage
    assert job["node_list"] == "node[1-2]"
    assert step["max_rss_bytes"] == 62332 * 1024 and step["max_rss_node"] == "node2"
    assert step["ave_cpu_s"] == 0.0 and step["job_name"] == "bash"
    assert step["tres_usage_in_max"]["mem"] == "62332K"
    assert rows["batch"]["node_list"] == "node1"


def test_failed_keeps_exit_code():
    rows = rows_of("failed.txt")
    assert rows["job"]["state"] == "FAILED"
    assert (rows["0"]["exit_code"], rows["0"]["exit_signal"]) == (3, 0)
    assert rows["extern"]["state"] == "COMPLETED"


def test_timeout_job_and_its_killed_steps():
    rows = rows_of("timeout.txt")
    assert rows["job"]["state"] == "TIMEOUT" and rows["job"]["elapsed_s"] == 72.0
    assert rows["batch"]["state"] == "FAILED" and rows["batch"]["exit_code"] == 15
    assert rows["0"]["state"] == "CANCELLED" and rows["0"]["exit_signal"] == 15


def test_cancelled_by_uid_is_normalised_and_raw_text_kept():
    rows = rows_of("cancelled.txt")
    assert rows["job"]["state"] == "CANCELLED"
    assert rows["job"]["state_raw"] == "CANCELLED by 0"
    assert rows["0"]["state_raw"] == "CANCELLED"


def test_memory_limit_kill_without_cgroups():
    rows = rows_of("memlimit_kill.txt")
    assert rows["0"]["state"] == "CANCELLED" and rows["0"]["exit_signal"] == 9
    assert rows["0"]["max_rss_bytes"] == 599300 * 1024
    assert rows["job"]["state"] == "FAILED" and rows["job"]["exit_code"] == 9


def test_out_of_memory_handwritten():
    rows = rows_of("out_of_memory.handwritten.txt")
    assert rows["0"]["state"] == "OUT_OF_MEMORY"
    assert (rows["0"]["exit_code"], rows["0"]["exit_signal"]) == (0, 125)
    assert rows["0"]["max_rss_bytes"] == int(1.5 * 1024**3)
    assert rows["0"]["ave_cpu_s"] == pytest.approx(3.25)


def test_wrong_field_count_names_the_format():
    with pytest.raises(ValueError, match="expected 10"):
        slurm.parse_sacct("1|wrap|COMPLETED\n")


def test_field_list_is_one_constant():
    assert slurm.SACCT_FORMAT == ",".join(slurm.SACCT_FIELDS)
    assert slurm.SACCT_FIELDS == ("JobID", "JobName", "State", "ExitCode", "Elapsed", "MaxRSS",
                                  "MaxRSSNode", "AveCPU", "TRESUsageInMax", "NodeList")


def _run_append(tmp_path, env_extra, *args):
    out = tmp_path / "run.jsonl"
    out.write_text('{"type": "run"}\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), **env_extra)
    done = subprocess.run([sys.executable, "-m", "pipeinfer.record.sacct", "append-sacct", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=60)
    return done, out


def test_no_sacct_on_path_prints_one_info_line_and_writes_nothing(tmp_path):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    done, out = _run_append(tmp_path, {"PATH": str(empty_bin), "SLURM_JOB_ID": "123"})
    assert done.returncode == 0
    assert done.stderr.strip().count("\n") == 0 and "sacct not found" in done.stderr
    assert out.read_text() == '{"type": "run"}\n'


def test_outside_slurm_prints_one_info_line_and_writes_nothing(tmp_path):
    done, out = _run_append(tmp_path, {})
    assert done.returncode == 0 and "not running under Slurm" in done.stderr
    assert out.read_text() == '{"type": "run"}\n'


def _fake_sacct(tmp_path, script):
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    sacct = bin_dir / "sacct"
    sacct.write_text("#!/bin/sh\n# Stand-in for sacct in tests/test_sacct.py\n" + script)
    sacct.chmod(0o755)
    return str(bin_dir) + os.pathsep + os.environ["PATH"]


def test_accounting_disabled_prints_one_info_line_and_writes_nothing(tmp_path):
    path = _fake_sacct(tmp_path, 'echo "sacct: error: Slurm accounting storage is disabled" >&2; exit 1\n')
    done, out = _run_append(tmp_path, {"PATH": path, "SLURM_JOB_ID": "123"})
    assert done.returncode == 0 and "accounting storage is disabled" in done.stderr
    assert done.stderr.strip().count("\n") == 0
    assert out.read_text() == '{"type": "run"}\n'


def test_append_writes_one_complete_sacct_line(tmp_path):
    path = _fake_sacct(tmp_path, f'cat "{DATA / "completed_2nodes.txt"}"\n')
    done, out = _run_append(tmp_path, {"PATH": path}, "--job-id", "2")
    assert done.returncode == 0, done.stderr
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[1])
    assert record["type"] == "sacct" and record["job_id"] == "2"
    assert [r["step"] for r in record["rows"]] == [None, "batch", "extern", "0"]


def test_append_after_a_torn_last_line_starts_a_new_line(tmp_path):
    out = tmp_path / "run.jsonl"
    out.write_text('{"type": "run"}\n{"type": "prom')     # a writer killed mid-line
    slurm.append_record(str(out), {"type": "sacct"})
    assert out.read_text().splitlines()[-1] == '{"type": "sacct"}'
    # the fragment is cut off, as a resume would cut it, so the file still resumes and reports
    assert out.read_text().splitlines() == ['{"type": "run"}', '{"type": "sacct"}']
    assert read_results(str(out)) == [{"type": "run"}, {"type": "sacct"}]
