"""Slurm accounting (sacct) for a finished run: one {"type": "sacct"} record appended to the output JSONL.

Run by submit.sbatch after the srun step has finished (a step's State and MaxRSS are final only then):

    python -m pipeinfer.record.sacct append-sacct outputs/run.jsonl [--job-id 1234]

Outside Slurm, without sacct, or with accounting disabled it prints one info line and writes nothing.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

from pipeinfer.record.results import ResultsWriter, read_results

# The sacct columns, in the order `--format` asks for them and parse_sacct reads them.
SACCT_FIELDS = (
    "JobID", "JobName", "State", "ExitCode", "Elapsed",
    "MaxRSS", "MaxRSSNode", "AveCPU", "TRESUsageInMax", "NodeList",
)
SACCT_FORMAT = ",".join(SACCT_FIELDS)

_UNIT_BYTES = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "COMPLETING", "CONFIGURING"}


def parse_duration(text):
    """Seconds in a sacct time: '1-02:03:04', '00:01:02', '12:34.567' (MM:SS.mmm) or '' -> None."""
    text = text.strip()
    if not text or text in ("INVALID", "UNLIMITED", "Partition_Limit"):
        return None
    days, _, clock = text.rpartition("-")
    parts = [float(p) for p in clock.split(":")]
    if not 1 <= len(parts) <= 3:
        raise ValueError(f"sacct time {text!r}: expected [D-][HH:]MM:SS[.mmm]")
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds + (int(days) * 86400 if days else 0)


def parse_size(text):
    """Bytes in a sacct size: '1234K', '5.5M', '2G', '0' (bytes) or '' -> None. Units are powers of 1024."""
    text = text.strip()
    if not text:
        return None
    unit = text[-1].upper() if text[-1].isalpha() else ""
    if unit not in _UNIT_BYTES:
        raise ValueError(f"sacct size {text!r}: unknown unit {unit!r}, expected one of K M G T P")
    return int(round(float(text[: len(text) - len(unit)]) * _UNIT_BYTES[unit]))


def parse_tres(text):
    """'cpu=00:00:00,mem=10768K,...' -> {'cpu': '00:00:00', 'mem': '10768K', ...} (values kept as text)."""
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def parse_sacct_row(fields):
    """One sacct row (the SACCT_FIELDS values, in order) -> a record with numbers in seconds and bytes."""
    raw = dict(zip(SACCT_FIELDS, fields))
    job_id, _, step = raw["JobID"].partition(".")
    code, _, signal = raw["ExitCode"].partition(":")
    return {
        "job_id": job_id,
        "step": step or None,                        # None for the job itself; 'batch', 'extern', '0', ...
        "job_name": raw["JobName"],
        "state": raw["State"].split()[0].rstrip("+") if raw["State"].strip() else "",
        "state_raw": raw["State"],                   # e.g. 'CANCELLED by 0'
        "exit_code": int(code) if code else None,
        "exit_signal": int(signal) if signal else None,
        "elapsed_s": parse_duration(raw["Elapsed"]),
        "max_rss_bytes": parse_size(raw["MaxRSS"]),
        "max_rss_node": raw["MaxRSSNode"] or None,
        "ave_cpu_s": parse_duration(raw["AveCPU"]),
        "tres_usage_in_max": parse_tres(raw["TRESUsageInMax"]),
        "node_list": raw["NodeList"],
    }


def parse_sacct(text):
    """Rows of `sacct -P --noheader --format=SACCT_FORMAT` output -> list of records (parse_sacct_row)."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) != len(SACCT_FIELDS):
            raise ValueError(
                f"sacct line has {len(fields)} fields, expected {len(SACCT_FIELDS)} ({SACCT_FORMAT}): {line!r}; "
                f"run sacct with -P --noheader --format={SACCT_FORMAT}")
        rows.append(parse_sacct_row(fields))
    return rows


def _info(message):
    print(f"pipeinfer.slurm: {message}", file=sys.stderr, flush=True)


def _settled(rows):
    """Accounting has caught up: srun steps have ended, and every ended step has its MaxRSS."""
    steps = [r for r in rows if r["step"] is not None]
    numbered_active = [r for r in steps if r["step"] not in ("batch", "extern") and r["state"] in _ACTIVE_STATES]
    ended_without_rss = [r for r in steps if r["state"] not in _ACTIVE_STATES and r["max_rss_bytes"] is None]
    return bool(rows) and not numbered_active and not ended_without_rss


def query_sacct(job_id, retries=10, delay_s=1.0, sacct="sacct"):
    """Parsed sacct rows of job_id, retried while accounting lags; None (with an info line) if sacct fails."""
    command = [sacct, "-j", str(job_id), "-P", "--noheader", f"--format={SACCT_FORMAT}"]
    rows = []
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(delay_s)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            _info(f"sacct not usable ({err}); no sacct record written")
            return None
        if done.returncode != 0:
            first = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
            _info(f"sacct -j {job_id} failed (exit {done.returncode}: {first}); no sacct record written")
            return None
        rows = parse_sacct(done.stdout)
        if _settled(rows):
            break
    else:
        _info(f"sacct -j {job_id}: accounting not settled after {retries} tries; writing the rows as they are")
    return rows


def append_record(output_path, record):
    """Append one record to a results file as the runner's writer does (one fsynced line), after
    cutting off a torn last line the way a resume would: a rank-0 process killed mid-write must
    leave neither this record swallowed nor a broken line before it (which no resume accepts)."""
    if os.path.exists(output_path):
        read_results(output_path)  # repairs a torn tail; ResultsError on a corrupt file
    writer = ResultsWriter(output_path)
    try:
        writer.write(record)
    finally:
        writer.close()


def maybe_log_sacct(output_path, job_id=None, retries=10, delay_s=1.0):
    """Append {"type": "sacct", "job_id", "rows"} to output_path when under Slurm with working accounting.

    Returns the record, or None after one info line on stderr (not under Slurm, no sacct, accounting
    disabled, output not writable). Never raises.
    """
    try:
        job_id = job_id or os.environ.get("SLURM_JOB_ID")
        if not job_id:
            _info("not running under Slurm (no SLURM_JOB_ID, no --job-id); no sacct record written")
            return None
        sacct = shutil.which("sacct")
        if sacct is None:
            _info(f"sacct not found on PATH; no sacct record written for job {job_id}")
            return None
        rows = query_sacct(job_id, retries=retries, delay_s=delay_s, sacct=sacct)
        if rows is None:
            return None
        if not rows:
            _info(f"sacct knows no job {job_id}; no sacct record written")
            return None
        record = {"type": "sacct", "job_id": str(job_id), "rows": rows}
        append_record(output_path, record)
        return record
    except Exception as err:  # accounting is a bonus: it must never fail the run
        _info(f"sacct record for job {job_id} not written to {output_path}: {type(err).__name__}: {err}")
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipeinfer.record.sacct", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    append = commands.add_parser("append-sacct", help="append the job's sacct record to OUTPUT (JSONL)")
    append.add_argument("output", help="the run's output JSONL")
    append.add_argument("--job-id", help="Slurm job id (default: $SLURM_JOB_ID)")
    append.add_argument("--retries", type=int, default=10, help="sacct tries while accounting lags (default 10)")
    append.add_argument("--delay", type=float, default=1.0, help="seconds between tries (default 1)")
    args = parser.parse_args(argv)
    record = maybe_log_sacct(args.output, job_id=args.job_id, retries=args.retries, delay_s=args.delay)
    if record is not None:
        _info(f"appended sacct record of job {record['job_id']} ({len(record['rows'])} rows) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
