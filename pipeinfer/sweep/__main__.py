"""Sweeps: which configuration is best for this model on these nodes?

    python -m pipeinfer.sweep sweep.json                # check, plan and list the cells; run nothing
    python -m pipeinfer.sweep sweep.json --local        # run the cells here, one after another
    python -m pipeinfer.sweep sweep.json --submit       # one Slurm job array per node count
    python -m pipeinfer.report SWEEP_DIR                # the comparative report

The sweep file (grid.py) names a base config and axes; every cell is checked (a bad sweep file is
one line, exit 2, before anything runs), planned with the dry run (cells that cannot fit are
dropped and listed with the reason), and run into <out>/cells/<name>/results.jsonl. Rerunning
resumes: finished cells are not run again, and a cell stopped half-way resumes its own file.
Exit 0: every cell that fits has finished (--local) or is submitted or queued (--submit); 1: a
cell failed (its run.log says why); 2: bad input; 75: a cell was stopped (rerun to resume).
"""

from __future__ import annotations

import argparse
import sys

from pipeinfer.config import ConfigError, human_bytes
from pipeinfer.sweep.grid import SweepError, load_sweep
from pipeinfer.sweep.launch import finished, plan_cells, run_local, submit, write_sweep


def _planned(plan: dict | None) -> str:
    if not plan or not plan.get("ranks"):
        return "-"
    return human_bytes(max(r["total"] for r in plan["ranks"]))


def print_cells(plans, reference: str) -> None:
    print("| cell | nodes | planned peak/rank | state |")
    print("|---|---|---|---|")
    for p in plans:
        ref = " (reference)" if p.cell.name == reference else ""
        print(f"| {p.cell.name}{ref} | {p.cell.nodes} | {_planned(p.plan)} | {p.state} |")
    for p in plans:
        if p.state == "dropped":
            print(f"dropped {p.cell.name}: {p.reason}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeinfer.sweep", description=__doc__.splitlines()[0])
    ap.add_argument("sweep", help="the sweep file (JSON: base, axes, ...)")
    how = ap.add_mutually_exclusive_group()
    how.add_argument("--local", action="store_true", help="run the cells here, one after another")
    how.add_argument("--submit", action="store_true", help="submit the cells to Slurm, one job array per node count")
    ap.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG",
                    help="an extra sbatch option for every array, e.g. --sbatch-arg=--time=00:30:00")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        plans = plan_cells(sweep)
    except (SweepError, ConfigError) as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    path = write_sweep(sweep, plans)
    print(f"{len(plans)} cells ({sum(p.state == 'dropped' for p in plans)} dropped), written to {path}")
    status = 0
    if args.submit:
        try:
            new = submit(sweep, plans, args.sbatch_arg)
        except (ConfigError, OSError) as e:
            print(f"sweep: error: {e}", file=sys.stderr)
            return 2
        print(f"submitted {len(new)} cells" if new else "nothing to submit: every cell that fits is finished or queued")
    elif args.local:
        for p in plans:
            if p.state != "to run":
                continue
            print(f"+ cell {p.cell.name}: {p.cell.nodes} rank(s)", flush=True)
            code = run_local(sweep, p)
            p.state = "finished" if code == 0 and finished(p.cell.config["output_path"]) else f"exit {code}"
            if code != 0:
                print(f"cell {p.cell.name} exited {code}: see {sweep.cell_dir(p.cell)}/run.log", file=sys.stderr)
                status = max(status, 75 if code == 75 else 1)
    print_cells(plans, sweep.reference({p.cell.name for p in plans if p.fits}))
    if not args.local and not args.submit:
        print("plan only: --local runs the cells here, --submit submits them to Slurm")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
