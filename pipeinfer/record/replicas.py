"""Replicas: R independent pipelines, each on its own share of the prompts, merged into one file.

    python -m pipeinfer.record.replicas --config exp_config.json [--set KEY=VALUE ...] [--resubmit CMD]

Replica r of R runs the prompts r, r + R, r + 2R, ... (share(): a stride, so that a prompt set
sorted by length loads every replica alike, and the same on every rerun, so a failed replica's
rerun resumes its own file) and writes <output_path stem>.replica<r>.jsonl (config.results_path).
The merge reads those files and writes output_path: the merge record, each share's run records,
every prompt record once in prompt order with its "replica", then each share's stage, summary and
sacct records. It refuses, one line and exit 2, shares whose configs (beyond the keys a resume may
change) or prompts differ; where a share is missing prompts it names the shares, prints the
command that reruns only those (--resubmit, with {tasks} for their ids) and exits 75 without
writing output_path: rerun, then merge again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys

from pipeinfer.config import ConfigError, ExpConfig, load_config, replica_path
from pipeinfer.record.results import RESUMABLE_CHANGES, ResultsError, read_results

EXIT_INCOMPLETE = 75  # as the runner's "stopped, rerun to resume"


class MergeError(ValueError):
    """Shares that cannot be merged: the message names the files and what differs."""


def share(total: int, replicas: int, replica: int) -> list[int]:
    """The prompt indices replica `replica` of `replicas` runs: replica, replica + replicas, ...
    E.g. 5 prompts over 2 replicas: [0, 2, 4] and [1, 3]; a replica beyond the prompts runs none."""
    return list(range(replica, total, replicas))


def prompts_digest(hashes: list[str]) -> str:
    """One hash of the whole prompt set, in order (each prompt's prompt_sha256): what every share
    must agree on."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]


def replica_record(cfg: ExpConfig, hashes: list[str]) -> dict:
    """The run record's "replica" entry: which share of which prompt set this pipeline ran."""
    return {"replica": cfg.replica, "replicas": cfg.replicas, "prompts": len(hashes),
            "prompts_sha256": prompts_digest(hashes), "share": len(share(len(hashes), cfg.replicas, cfg.replica))}


def _same_config(a: dict, b: dict) -> list[str]:
    skip = RESUMABLE_CHANGES | {"replica"}
    return sorted(k for k in set(a) | set(b) if k not in skip and a.get(k) != b.get(k))


def merge(cfg: ExpConfig) -> tuple[list[dict], list[int]]:
    """(the merged records, the replicas whose share is incomplete). MergeError for shares that
    disagree; incomplete shares leave the records empty."""
    shares: dict[int, list[dict]] = {}
    for r in range(cfg.replicas):
        path = replica_path(cfg.output_path, r)
        if os.path.exists(path):
            try:
                shares[r] = read_results(path)
            except (ResultsError, OSError) as e:
                raise MergeError(f"{path}: {e}") from None
    facts, first = None, None
    for r, records in shares.items():
        path = replica_path(cfg.output_path, r)
        for run in (x for x in records if x.get("type") == "run"):
            rep = run.get("replica") or {}
            if rep.get("replica") != r or rep.get("replicas") != cfg.replicas:
                raise MergeError(f"{path} was written by replica {rep.get('replica')} of {rep.get('replicas')}, not "
                                 f"{r} of {cfg.replicas}: merge with the replicas the shares ran with")
            if first is None:
                facts, first = (rep.get("prompts"), rep.get("prompts_sha256"), run.get("config") or {}), path
                continue
            if (rep.get("prompts"), rep.get("prompts_sha256")) != facts[:2]:
                raise MergeError(f"{path} ran other prompts ({rep.get('prompts')} prompts, digest "
                                 f"{rep.get('prompts_sha256')}) than {first} ({facts[0]}, {facts[1]}): rerun every "
                                 f"replica with the same prompts")
            differ = _same_config(run.get("config") or {}, facts[2])
            if differ:
                raise MergeError(f"{path} ran another config than {first} ({', '.join(differ)} differ): rerun "
                                 f"every replica with the same config")
    if facts is None:
        return [], list(range(cfg.replicas))
    total = facts[0]
    incomplete, prompts = [], {}
    for r in range(cfg.replicas):
        got = {p["prompt_index"]: p for p in shares.get(r, []) if p.get("type") == "prompt"}
        if set(got) != set(share(total, cfg.replicas, r)):
            incomplete.append(r)
        prompts.update({i: dict(p, replica=r) for i, p in got.items()})
    if incomplete:
        return [], incomplete
    head = {"type": "merge", "replicas": cfg.replicas, "prompts": total, "prompts_sha256": facts[1],
            "sources": [replica_path(cfg.output_path, r) for r in range(cfg.replicas)]}
    tagged = {kind: [dict(x, replica=r) for r, records in sorted(shares.items()) for x in records
                     if x.get("type") == kind] for kind in ("run", "stage", "summary", "sacct")}
    return ([head, *tagged["run"], *(prompts[i] for i in range(total)), *tagged["stage"], *tagged["summary"],
             *tagged["sacct"]], [])


def write_merged(path: str, records: list[dict]) -> None:
    """All at once: a temporary file, fsynced, renamed over output_path (never half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.merging.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pipeinfer.record.replicas",
                                 description="Merge the replicas' results files into output_path, in prompt order.")
    ap.add_argument("--config", default="exp_config.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resubmit", metavar="CMD", help="the command that reruns some replicas, {tasks} standing for "
                                                      "their ids (e.g. 1,3); printed when shares are incomplete")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if cfg.replicas < 2:
            raise ConfigError(f"replicas={cfg.replicas}: nothing to merge; set replicas to the count the shares "
                              f"ran with")
        records, incomplete = merge(cfg)
    except (ConfigError, MergeError) as e:
        print(f"merge: error: {e}", file=sys.stderr)
        return 2
    if incomplete:
        tasks = ",".join(map(str, incomplete))
        launch = (f"torchrun --nproc-per-node={cfg.pipeline_size} --master-port={cfg.master_port}"
                  if cfg.pipeline_size > 1 else "python")
        given = " ".join(shlex.quote(a) for s in args.set for a in ("--set", s))
        again = (args.resubmit.replace("{tasks}", tasks) if args.resubmit else
                 " && ".join(f"{launch} run_distributed_inference.py --config {shlex.quote(args.config)} {given} "
                             f"--set replica={r}".replace("  ", " ") for r in incomplete))
        print(f"merge: shares of replicas {tasks} are incomplete ({', '.join(replica_path(cfg.output_path, r) for r in incomplete)}); "
              f"{cfg.output_path} not written. Rerun only those (each resumes its own file), then merge again:\n"
              f"{again}", file=sys.stderr)
        return EXIT_INCOMPLETE
    write_merged(cfg.output_path, records)
    print(f"merged {records[0]['prompts']} prompts from {cfg.replicas} replicas into {cfg.output_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
