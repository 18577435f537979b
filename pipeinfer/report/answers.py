"""Print a run's prompts and the model's answers as a transcript, from its results JSONL.

    python -m pipeinfer.report.answers results/demo.jsonl          # what `make demo` prints at the end

A chat prompt prints as its messages ("user: ..."), a plain prompt as its text, each followed by
the generated text, its token count and finish reason. Bad input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import sys

from pipeinfer.report.summary import ReportError, read_records


def transcript(records: list[dict]) -> str:
    """The prompt records, in prompt order, as readable text."""
    prompts = sorted((r for r in records if r.get("type") == "prompt"), key=lambda r: r.get("prompt_index", 0))
    blocks = []
    for rec in prompts:
        prompt = rec.get("prompt")
        if isinstance(prompt, list):
            lines = [f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict)]
        else:
            lines = [f"prompt: {prompt}"]
        why = rec.get("finish_reason")
        if why == "stop" and rec.get("stop_reason") is not None:
            why += f" at {rec['stop_reason']!r}"
        tail = f"  ({rec.get('new_tokens')} tokens{', ' + why if why else ''})"
        lines.append(f"assistant: {rec.get('output_text', '').strip()}{tail}")
        blocks.append(f"[{rec.get('prompt_index')}] " + "\n    ".join(lines))
    return "\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeinfer.report.answers", description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a results JSONL a run wrote (its output_path)")
    args = ap.parse_args(argv)
    try:
        records, _ = read_records(args.results)
        if not any(r.get("type") == "prompt" for r in records):
            raise ReportError(f"{args.results}: no prompt records: the run finished no prompt; rerun it")
    except ReportError as e:
        print(f"answers: error: {e}", file=sys.stderr)
        return 2
    print(transcript(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
