"""python -m pipeinfer.report RESULTS.jsonl [MORE.jsonl ...] [--out DIR] [--window SECONDS]: the
tables (tables.py) and, with --out, the plots (plots.py) of one or more runs side by side.
python -m pipeinfer.report SWEEP_DIR [--out DIR]: a sweep's comparative report (sweep.py)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipeinfer.report.summary import MPL_HINT, ReportError, load_run, summarize
from pipeinfer.report.sweep import format_report, is_sweep, sweep_report, write_sweep_plot
from pipeinfer.report.tables import format_table


def sweep_main(sweep_dir: str, out: str | None) -> int:
    """A sweep folder: the comparative table, report.md, sweep.json and sweep.png under out (SWEEP_DIR/report)."""
    out = out or os.path.join(sweep_dir, "report")
    try:
        rep = sweep_report(sweep_dir)
        os.makedirs(out, exist_ok=True)
    except (ReportError, OSError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    text = format_report(rep)
    print(text)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump(rep, f, indent=2)
    try:
        print("plots: " + write_sweep_plot(rep, os.path.join(out, "sweep.png")))
    except ImportError:
        print(MPL_HINT)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeinfer.report", description="Summarise pipeinfer results: a table in the terminal and PNG plots, one run or several side by side.")
    parser.add_argument("results", nargs="+", help="results JSONL files; several are compared side by side; or one "
                                                   "sweep folder (python -m pipeinfer.sweep): its comparative report")
    parser.add_argument("--out", help="directory for the PNG plots (without it, only the table)")
    parser.add_argument("--window", type=float, metavar="SECONDS",
                        help="timeline shows the first SECONDS (default: whole run, or the first batch of long runs)")
    args = parser.parse_args(argv)
    if len(args.results) == 1 and is_sweep(args.results[0]):
        return sweep_main(args.results[0], args.out)
    try:
        runs = [load_run(p) for p in args.results]
        if args.out:
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise ReportError(f"--out {args.out}: is a file: give a directory for the plots")
            try:
                os.makedirs(args.out, exist_ok=True)
            except OSError as e:
                raise ReportError(f"--out {args.out}: cannot create it ({e.strerror}): "
                                  "choose a writable directory") from None
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    seen: dict[str, int] = {}
    for run in runs:  # the same file twice still gets two distinct columns
        seen[run.label] = seen.get(run.label, 0) + 1
        run.label += f" #{seen[run.label]}" if seen[run.label] > 1 else ""
    summaries = [summarize(r) for r in runs]
    print(format_table(summaries))
    if args.out:
        try:
            from pipeinfer.report.plots import write_plots  # imports matplotlib

            paths = write_plots(runs, summaries, args.out, window_s=args.window)
        except ImportError:
            print(MPL_HINT)
        else:
            print("plots: " + ", ".join(paths))
    return 0

