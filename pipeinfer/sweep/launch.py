"""A sweep's cells planned, then run: one after another here, or as Slurm job arrays.

Every cell gets the dry run first (pipeinfer.plan: headers only, no weights); a cell that cannot
fit its budget, or that the plan refuses, is dropped with the reason. A cell is finished when its
results file ends with a summary that was not interrupted; finished cells never run again, and
under Slurm a cell whose job is still queued or running is not submitted twice (<out>/jobs.json).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from pipeinfer.config import ConfigError, parse_bytes
from pipeinfer.plan.__main__ import dry_run
from pipeinfer.sweep.grid import Cell, Sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "run_distributed_inference.py")


@dataclass
class CellPlan:
    cell: Cell
    fits: bool
    reason: str | None      # why it was dropped
    plan: dict | None       # the dry run's record (each rank's planned bytes)
    state: str = "to run"   # finished, queued (under Slurm), to run, dropped


def finished(results: str) -> bool:
    """The cell's results file ends (sacct aside) with a summary of an attempt that was not interrupted."""
    try:
        with open(results, encoding="utf-8") as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip()]
    except OSError:
        return False
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            return False
        if rec.get("type") == "sacct":
            continue
        return rec.get("type") == "summary" and rec.get("interrupted") is False
    return False


def plan_cells(sweep: Sweep) -> list[CellPlan]:
    """The dry run of every cell, against device_memory (else each cell's max_memory)."""
    budget = parse_bytes(sweep.device_memory) if sweep.device_memory is not None else None
    longest: dict[str, int] = {}  # the prompts' longest length, per tokenizer and prompt set
    out = []
    for cell in sweep.cells:
        c = cell.cfg
        key = json.dumps([c.model_path, c.prompts, c.prompts_file, c.chat_template, c.system_prompt,
                          c.messages_field])
        try:
            if key not in longest:
                longest[key] = dry_run(c, budget)["longest_prompt"]
            plan = dry_run(c, budget, prompt_tokens=longest[key])
        except ConfigError as e:
            out.append(CellPlan(cell, False, str(e), None, "dropped"))
            continue
        out.append(CellPlan(cell, plan["fits"], plan.get("error"), plan, "to run" if plan["fits"] else "dropped"))
    for p in out:
        if p.fits and finished(p.cell.config["output_path"]):
            p.state = "finished"
    return out


def write_sweep(sweep: Sweep, plans: list[CellPlan]) -> str:
    """<out>/sweep.json (what the report reads) and each cell's config.json and plan.json."""
    os.makedirs(sweep.out, exist_ok=True)
    cells = []
    for p in plans:
        d = sweep.cell_dir(p.cell)
        os.makedirs(d, exist_ok=True)
        _write_json(os.path.join(d, "config.json"), p.cell.config)
        if p.plan is not None:
            _write_json(os.path.join(d, "plan.json"), p.plan)
        cells.append({"name": p.cell.name, "values": p.cell.values, "nodes": p.cell.nodes, "fits": p.fits,
                      "dropped": None if p.fits else p.reason, "results": p.cell.config["output_path"]})
    path = os.path.join(sweep.out, "sweep.json")
    _write_json(path, {"sweep": os.path.abspath(sweep.path), "axes": sweep.axes, "device_memory": sweep.device_memory,
                       "reference": sweep.reference({p.cell.name for p in plans if p.fits}), "cells": cells})
    return path


def _write_json(path: str, data) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(sweep: Sweep, plan: CellPlan, timeout_s: float | None = None) -> int:
    """One cell here: pipeline_size rank processes (as srun starts them), their output in
    <cell>/run.log. Returns the worst exit status (0 done; 75 stopped, rerun to resume)."""
    cell = plan.cell
    config = os.path.join(sweep.cell_dir(cell), "config.json")
    port = _free_port()
    log_path = os.path.join(sweep.cell_dir(cell), "run.log")
    with open(log_path, "a", encoding="utf-8") as log:
        procs = [subprocess.Popen([sys.executable, ENTRY, "--config", config], cwd=os.getcwd(), stdout=log,
                                  stderr=subprocess.STDOUT,
                                  env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(cell.nodes), LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                 for r in range(cell.nodes)]
        try:
            codes = [p.wait(timeout=timeout_s) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return max(codes, key=lambda c: (c != 0, c))


def _slurm(command: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError(f"{command[0]} not found: submit from a Slurm login node, or run the cells here with "
                          f"--local") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{command[0]} did not answer in 60 s: is the Slurm controller up? (sinfo)") from None


def queued_jobs(jobs: dict[str, str]) -> set[str]:
    """The cells whose Slurm array task ("123_4") is still pending or running."""
    if not jobs:
        return set()
    ids = sorted({j.split("_")[0] for j in jobs.values()})
    out = _slurm(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(ids)])
    live = set(out.stdout.split()) if out.returncode == 0 else set()
    return {cell for cell, job in jobs.items() if job in live}


def submit(sweep: Sweep, plans: list[CellPlan], sbatch_args: list[str]) -> dict[str, str]:
    """One job array of submit.sbatch per node count over the cells to run (EXP_CONFIG_LIST names
    each task's config); the new {cell: "array_task"} are added to <out>/jobs.json."""
    jobs_path = os.path.join(sweep.out, "jobs.json")
    jobs = json.load(open(jobs_path, encoding="utf-8")) if os.path.exists(jobs_path) else {}
    live = queued_jobs(jobs)
    for p in plans:
        if p.state == "to run" and p.cell.name in live:
            p.state = "queued"
    new: dict[str, str] = {}
    logs = os.path.abspath(os.path.join(sweep.out, "logs"))
    os.makedirs(logs, exist_ok=True)
    for nodes in sorted({p.cell.nodes for p in plans if p.state == "to run"}):
        group = [p.cell for p in plans if p.state == "to run" and p.cell.nodes == nodes]
        listing = os.path.abspath(os.path.join(sweep.out, f"nodes{nodes}-{time.strftime('%Y%m%d-%H%M%S')}.txt"))
        with open(listing, "w", encoding="utf-8") as f:
            f.writelines(os.path.abspath(os.path.join(sweep.cell_dir(c), "config.json")) + "\n" for c in group)
        command = ["sbatch", "--parsable", f"--array=0-{len(group) - 1}", f"--nodes={nodes}",
                   f"--job-name=sweep-{os.path.basename(os.path.abspath(sweep.out))}",
                   f"--output={logs}/%x-%A_%a.out", *sbatch_args, "submit.sbatch"]
        print("+ EXP_CONFIG_LIST=" + listing + " " + " ".join(command), flush=True)
        res = _slurm(command, env=dict(os.environ, EXP_CONFIG_LIST=listing))
        if res.returncode != 0:
            raise ConfigError(f"sbatch refused the {nodes}-node array: {res.stderr.strip()[:300]}")
        array = res.stdout.strip().split(";")[0]
        new.update({c.name: f"{array}_{i}" for i, c in enumerate(group)})
    for p in plans:
        if p.cell.name in new:
            p.state = "submitted " + new[p.cell.name]
    if new:
        _write_json(jobs_path, {**jobs, **new})
    return new
