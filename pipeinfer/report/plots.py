"""The report's four PNG plots (python -m pipeinfer.report --out DIR), drawn from report.py's
summaries: latency ECDFs, tokens/s per prompt, per-stage time shares, and the pipeline timeline.
matplotlib is imported only here, only when plots are asked for."""

from __future__ import annotations

import os

from pipeinfer.report.summary import EVENT_COLORS, LATENCY_METRICS, PLOTS, Run, num, timeline_window


def _ecdf(ax, values, label):
    xs = sorted(values)
    if xs:
        ax.step([xs[0]] + xs, [0.0] + [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)


def plot_latency(plt, runs, summaries, path):
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for ax, (key, name) in zip(axes, LATENCY_METRICS):
        all_ms = []
        for run, s in zip(runs, summaries):
            vals = ([1000 * x for p in run.prompts for x in (p.get("itl_s") or [])] if key == "itl_s"
                    else [1000 * p[key] for p in run.prompts if num(p.get(key)) is not None])
            _ecdf(ax, vals, s["label"])
            all_ms += vals
        positive = [v for v in all_ms if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
        ax.set(title=f"{name} CDF", xlabel=f"{name} (ms)",
               ylabel="fraction of gaps" if key == "itl_s" else "fraction of prompts")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tokens_per_s(plt, runs, summaries, path):
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * max(len(r.prompts) for r in runs) * len(runs) + 3), 4))
    width = 0.8 / len(runs)
    for i, (run, s) in enumerate(zip(runs, summaries)):
        xs = [p.get("prompt_index", j) + (i - (len(runs) - 1) / 2) * width for j, p in enumerate(run.prompts)]
        bars = ax.bar(xs, [num(p.get("tokens_per_s")) or 0 for p in run.prompts], width, label=s["label"])
        if s["mean_prompt_tokens_per_s"] is not None:
            ax.axhline(s["mean_prompt_tokens_per_s"], color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    ax.set_xticks(sorted({p.get("prompt_index", j) for r in runs for j, p in enumerate(r.prompts)}))
    ax.set(title="tokens/s per prompt (dashed: mean over prompts)", xlabel="prompt index", ylabel="new tokens / s")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_stages(plt, summaries, path):
    fig, axes = plt.subplots(1, len(summaries), figsize=(3 + 2.5 * len(summaries), 4), squeeze=False)
    parts = (("compute_s", "compute", EVENT_COLORS["decode"]), ("recv_wait_s", "recv wait", EVENT_COLORS["recv"]),
             ("send_s", "send", EVENT_COLORS["send"]), ("other_s", "other", "#bbbbbb"))
    for ax, s in zip(axes[0], summaries):
        ranks = [f"rank {st['rank']}" for st in s["stages"]]
        bottom = [0.0] * len(ranks)
        for key, name, color in parts:
            vals = [st[key] for st in s["stages"]]
            ax.bar(ranks, vals, bottom=bottom, color=color, label=name, width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set(title=s["label"], ylabel="seconds")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    fig.suptitle("per-stage time: compute / recv wait / send / other (wall - the rest)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timeline(plt, runs, summaries, path, window_s=None):
    from matplotlib.patches import Patch

    heights = [max(len(r.stages), 1) for r in runs]
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, sum(0.7 * h + 1.3 for h in heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, run, s in zip(axes[:, 0], runs, summaries):
        t0, t1, what = timeline_window(run.stages, window_s=window_s)
        for row, stage in enumerate(run.stages):
            for kind, color in EVENT_COLORS.items():
                spans = [(1000 * (a - t0), 1000 * (b - a)) for k, a, b in stage.get("events") or []
                         if k == kind and b >= t0 and a <= t1]
                ax.broken_barh(spans, (row - 0.4, 0.8), facecolors=color, linewidth=0)
        dropped = sum(st["events_dropped"] for st in s["stages"])
        ax.set_yticks(range(len(run.stages)), [f"rank {st.get('rank')}" for st in run.stages])
        ax.set_ylim(len(run.stages) - 0.5, -0.5)
        ax.set_xlim(0, 1000 * (t1 - t0) or 1)
        ax.set_xlabel("ms since the first event")
        ax.set_title(f"{s['label']}: {what}" + (f" ({dropped} events not recorded)" if dropped else ""), fontsize=10)
    handles = [Patch(color=c, label=k + (" (waiting)" if k == "recv" else "")) for k, c in EVENT_COLORS.items()]
    handles.append(Patch(facecolor="white", edgecolor="black", label="idle / untimed"))
    fig.legend(handles=handles, loc="upper right", ncol=5, fontsize=8)
    fig.suptitle("pipeline timeline (white gaps and red recv waits are bubbles)", x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(runs: list[Run], summaries: list[dict], out_dir: str, window_s: float | None = None) -> list[str]:
    """The four PNGs in out_dir; raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(out_dir, name) for name in PLOTS]
    plot_latency(plt, runs, summaries, paths[0])
    plot_tokens_per_s(plt, runs, summaries, paths[1])
    plot_stages(plt, summaries, paths[2])
    plot_timeline(plt, runs, summaries, paths[3], window_s=window_s)
    return paths
