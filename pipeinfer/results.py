"""The results file: append-only JSONL that a rerun of the same config resumes.

Each prompt's record is one complete line, flushed and fsynced before the prompt counts as done.
A rerun reads the file back (scan_previous): prompts already recorded, matched by prompt_index and
a hash of the prompt text, are skipped. A torn last line (the writer died mid-write) is cut off
with a warning; a corrupt line before the end, or records from a different config, refuse the
start with a one-line ResultsError, so nothing recorded is ever silently mixed or overwritten.
With resume=false the old file is kept as <output_path>.bak and a new one started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Keys that do not change any prompt's output: a run may resume with other values for them.
RESUMABLE_CHANGES = frozenset({"output_path", "timeout_s", "offload_folder", "master_port", "comm_backend", "resume",
                               "pipeline_size", "batch_size", "micro_batch_size", "layer_split", "max_memory",
                               "nvtx", "profile_steps", "progress"})


class ResultsError(ValueError):
    """The results file cannot be resumed; the message says why and what to do."""


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


@dataclass
class Previous:
    done: set[int] = field(default_factory=set)  # prompt indices already recorded


def read_results(path: str) -> list:
    """The records of an existing results file, after cutting off a torn last line (a writer died
    mid-write) with a warning, so that whatever is appended next starts on a line of its own.
    ResultsError when a corrupt line has records after it: that is not a torn write."""
    with open(path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")  # the piece after the last newline is b"" unless a write was cut short
    records, keep, torn = [], 0, bool(lines[-1])
    for n, raw in enumerate(lines[:-1]):
        try:
            records.append(json.loads(raw))
            keep += len(raw) + 1
        except (ValueError, UnicodeDecodeError):
            if n < len(lines) - 2 or lines[-1]:
                raise ResultsError(f"{path} line {n + 1} is corrupt, with more records after it: "
                                   f"move the file away, or set resume=false to start over") from None
            torn = True  # a garbled last line: treat it like a cut-short one
    if torn:
        log.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return records


def scan_previous(path: str, config: dict, prompts: list[str], resume: bool, dtype: str | None = None,
                  device_type: str | None = None) -> Previous:
    """Validate an existing results file for resuming; repair a torn tail. Runs on the writer only.

    dtype and device_type ("cpu", "cuda") are what this run resolved "auto" to: an earlier run
    that computed in another dtype or on another kind of device refuses the resume, since its
    outputs would differ in precision from the ones this run would append."""
    if not os.path.exists(path):
        return Previous()
    if not resume:
        try:
            os.replace(path, path + ".bak")
        except OSError as e:
            raise ResultsError(f"resume=false but {path} cannot be moved to {path}.bak ({e.strerror}): move or delete "
                               f"{path} yourself, or choose another output_path") from None
        log.warning("resume=false: moved the existing %s to %s.bak", path, path)
        return Previous()
    records = read_results(path)
    prev = Previous()
    for rec in records:
        kind = rec.get("type") if isinstance(rec, dict) else None
        if kind == "run":
            changed = sorted(k for k in set(config) | set(rec.get("config", {}))
                             if k not in RESUMABLE_CHANGES and config.get(k) != rec.get("config", {}).get(k))
            if changed:
                raise ResultsError(f"{path} holds results of a different config ({', '.join(changed)} differ): "
                                   f"use another output_path, or set resume=false to start over")
            ran = (rec.get("dtype"), str(rec.get("device", "")).split(":")[0])
            if dtype is not None and ran != (dtype, device_type):
                raise ResultsError(f"{path} holds results computed in {ran[0]} on {ran[1]}, but this run resolves "
                                   f"dtype={config.get('dtype')!r}, device={config.get('device')!r} to {dtype} on "
                                   f"{device_type}: resume where the outputs are computed alike (set dtype and device "
                                   f"explicitly), or use another output_path, or set resume=false")
        elif kind == "prompt":
            i = rec.get("prompt_index")
            if not isinstance(i, int) or not 0 <= i < len(prompts) or rec.get("prompt_sha256") != prompt_hash(prompts[i]):
                raise ResultsError(f"{path} records prompt_index={i} for a prompt that is not in this run's input "
                                   f"(the prompts changed): use another output_path, or set resume=false")
            if i in prev.done:
                raise ResultsError(f"{path} records prompt_index={i} twice: move the file away or set resume=false")
            prev.done.add(i)
    return prev


class ResultsWriter:
    """Appends complete, fsynced lines to the results file (rank 0 only)."""

    def __init__(self, path: str):
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise self._error(e) from None

    def write(self, record: dict) -> None:
        try:
            self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:  # a full disk, a quota, an I/O error: what is recorded so far stays resumable
            raise self._error(e) from None

    def _error(self, e: OSError) -> ResultsError:
        return ResultsError(f"cannot write output_path={self.path!r} ({e.strerror}): free space there or choose "
                            f"another output_path, then rerun to resume")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def check_writable(path: str) -> str | None:
    """None if output_path can be written, else a one-line reason with the fix."""
    if os.path.isdir(path) or path.endswith(("/", os.sep)):
        return f"output_path={path!r} is a directory: give a file path such as {os.path.join(path, 'run.jsonl')!r}"
    if os.path.exists(path) and not os.path.isfile(path):
        return (f"output_path={path!r} is not a regular file (a device or a pipe): results are appended, fsynced and "
                f"read back on a rerun; give a file path")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(path):
            with open(path, "a", encoding="utf-8"):  # appending nothing leaves it as it is
                pass
        else:  # probe the directory without creating output_path itself
            probe = os.path.join(parent, f".{os.path.basename(path)}.{os.getpid()}.probe")
            with open(probe, "w", encoding="utf-8"):
                pass
            os.remove(probe)
    except OSError as e:
        return (f"output_path={path!r} is not writable ({e.strerror}): "
                f"choose a writable location with --set output_path=...")
    return None
