"""The results file: append-only JSONL that a rerun of the same config resumes.

Each prompt's record is one complete line, flushed and fsynced before the prompt counts as done.
A rerun reads the file back (scan_previous): prompts already recorded, matched by prompt_index, a
hash of the rendered prompt text and the prompt's own settings (a .jsonl line's stop, ...), are
skipped. A torn last line (the writer died mid-write) is cut off with a warning; a corrupt line
before the end, records from a different config, or a record made under other settings than its
line now gives, refuse the start with a one-line ResultsError, so nothing recorded is ever
silently mixed or overwritten.
With resume=false a new file is started once every rank has loaded its stage; the old one is kept
as <output_path>.bak, or .bak.1, .bak.2, ... when older backups exist (none is ever replaced).

Resuming with another micro-batch geometry (batch_size, micro_batch_size, pipeline_size) is
accepted and said in the resume log line. In float32 a prompt's tokens do not depend on the
prompts batched with it; in bf16/fp16 they can (a near-tie may flip with the padding). Refusing the
change would not make such a file uniform: even an unchanged config regroups prompts on a resume
(the micro-batches in flight at the stop run again beside other prompts). So each prompt record
names the micro-batch it was computed in ("micro_batch": its prompt indices), and each attempt's
run record its config: what a reduced-precision file mixes can be read from the file itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Keys a run may resume with other values for: they change no prompt's output in float32 (the
# geometry ones regroup prompts into other micro-batches: see the module docstring).
GEOMETRY = ("pipeline_size", "batch_size", "micro_batch_size")
RESUMABLE_CHANGES = frozenset({"output_path", "timeout_s", "offload_folder", "master_port", "comm_backend", "resume",
                               "layer_split", "max_memory", "max_cpu_memory", "nvtx", "profile_steps", "progress",
                               *GEOMETRY})
# Config keys added after results files were first written, with their defaults.
NEWER_KEYS = {"replicas": 1, "replica": 0, "compile": "auto"}


class ResultsError(ValueError):
    """The results file cannot be resumed; the message says why and what to do."""


def prompt_hash(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


@dataclass
class Previous:
    done: set[int] = field(default_factory=set)  # prompt indices already recorded
    start_over: bool = False  # resume=false and a file exists: keep_backup() once the run is certain to start
    geometry: list[str] = field(default_factory=list)  # "batch_size 4 -> 2": what this attempt regroups

    def todo(self, indices: list[int]) -> list[int]:
        """The prompt indices (of this pipeline's share) still to run, in order."""
        return [i for i in indices if i not in self.done]


def keep_backup(path: str) -> str:
    """Move `path` to the first free name of <path>.bak, <path>.bak.1, <path>.bak.2, ...; returns it.
    Never replaces an existing file: the name is taken with a hard link, which fails if it exists."""
    for n in range(10000):
        backup = f"{path}.bak" + (f".{n}" if n else "")
        if os.path.lexists(backup):
            continue
        try:
            try:
                os.link(path, backup)
            except FileExistsError:
                continue  # taken meanwhile
            except OSError:  # no hard links on this filesystem: a rename to a name just seen free
                os.rename(path, backup)
                return backup
            os.unlink(path)
            return backup
        except OSError as e:
            raise ResultsError(f"resume=false but {path} cannot be moved to {backup} ({e.strerror}): move or delete "
                               f"{path} yourself, or choose another output_path") from None
    raise ResultsError(f"resume=false but {path} already has 10000 backups: remove old {path}.bak.* files")


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


def scan_previous(path: str, config: dict, prompts: list, resume: bool, dtype: str | None = None,
                  device_type: str | None = None) -> Previous:
    """Validate an existing results file for resuming; repair a torn tail. Runs on the writer only.

    prompts: the run's prompts.Prompt (its text, its own settings and where the input gives it), or
    plain texts (prompts with no settings of their own).

    dtype and device_type ("cpu", "cuda") are what this run resolved "auto" to: an earlier run
    that computed in another dtype or on another kind of device refuses the resume, since its
    outputs would differ in precision from the ones this run would append."""
    if not os.path.exists(path):
        return Previous()
    if not resume:
        return Previous(start_over=True)  # moved away only once every rank has loaded (keep_backup)
    records = read_results(path)
    config = {**NEWER_KEYS, **config}
    prev = Previous()
    for rec in records:
        kind = rec.get("type") if isinstance(rec, dict) else None
        if kind == "run":
            old = {**NEWER_KEYS, **rec.get("config", {})}  # a file from before these keys existed: their defaults
            prev.geometry = [f"{k} {json.dumps(old.get(k))} -> {json.dumps(config.get(k))}" for k in GEOMETRY
                             if old.get(k) != config.get(k)]  # against the latest attempt
            changed = sorted(k for k in set(config) | set(old)
                             if k not in RESUMABLE_CHANGES and config.get(k) != old.get(k))
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
            known = isinstance(i, int) and 0 <= i < len(prompts)
            if not known or rec.get("prompt_sha256") != prompt_hash(getattr(prompts[i], "text", prompts[i])):
                raise ResultsError(f"{path} records prompt_index={i} for a prompt that is not in this run's input "
                                   f"(the prompts changed): use another output_path, or set resume=false")
            _check_settings(path, i, rec.get("settings") or {}, prompts[i])
            if i in prev.done:
                raise ResultsError(f"{path} records prompt_index={i} twice: move the file away or set resume=false")
            prev.done.add(i)
    return prev


def _check_settings(path: str, i: int, recorded: dict, prompt) -> None:
    """A prompt's own settings (prompts.LINE_SETTINGS) make its record as much as its text does: a
    record made under others is not what the input now asks for. Every key is compared, whatever it
    is; a record without "settings" (an older file) was made with none of its own."""
    settings, where = getattr(prompt, "settings", {}), getattr(prompt, "where", "") or f"prompt {i}"
    if recorded == settings:
        return
    changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))

    def said(s: dict) -> str:
        told = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(s.items()))
        return told or "the run's settings"
    raise ResultsError(f"{path} records prompt_index={i} made with {said(recorded)}, but {where} now gives "
                       f"{said(settings)} ({', '.join(changed)} changed): set resume=false to start over (the old file "
                       f"is kept as a backup), or use another output_path")


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


# -- the writer's side of a run's start, in two steps around the ranks' loading -------------------

def check_previous(path: str, config: dict, prompts: list, resume: bool, dtype: str,
                   device_type: str) -> tuple[Previous | None, str | None]:
    """Before loading, on the writer (rank 0): (what output_path already holds, None), or (None, the
    one-line problem) when it cannot be written or resumed. Nothing changes on disk here, but a
    torn last line being cut off; the ranks agree on the answer before anyone loads."""
    try:
        problem = check_writable(path)
        if problem is not None:
            return None, problem
        return scan_previous(path, config, prompts, resume, dtype, device_type), None
    except (ResultsError, OSError) as e:
        return None, str(e)


def start_results(path: str, previous: Previous, total: int) -> ResultsWriter:
    """Once every rank has loaded its stage, on the writer: say what is resumed, move an old file
    away for resume=false (keep_backup: only now, so a run that fails to load moves nothing), and
    open the results file for appending."""
    if previous.done:
        log.info("resuming: %d of %d prompts already in %s%s", len(previous.done), total, path,
                 f"; the file now mixes micro-batch geometries ({', '.join(previous.geometry)}): each prompt "
                 f"record names its micro_batch" if previous.geometry else "")
    if previous.start_over:
        log.warning("resume=false: moved the existing %s to %s", path, keep_backup(path))
    return ResultsWriter(path)
