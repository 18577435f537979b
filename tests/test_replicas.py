"""Replicas: each pipeline runs its own share of the prompts; the merge writes one file in prompt
order, equal token for token to transformers' generate(), and refuses shares that disagree.

    pytest tests/test_replicas.py
"""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, base_config, launch, reference_outputs

from pipeinfer.record.replicas import share
from pipeinfer.report.summary import load_run, summarize

PROMPTS = ["Hello", "The quick brown fox jumps over", "a", "Pipeline parallel inference, token for token.", "Yo"]


@pytest.mark.parametrize("total, replicas, expected", [
    (5, 2, [[0, 2, 4], [1, 3]]), (3, 1, [[0, 1, 2]]), (2, 3, [[0], [1], []]), (7, 3, [[0, 3, 6], [1, 4], [2, 5]]),
])
def test_share_is_a_stride_covering_every_prompt_once(total, replicas, expected):
    shares = [share(total, replicas, r) for r in range(replicas)]
    assert shares == expected
    assert sorted(i for s in shares for i in s) == list(range(total))


def merge(config_path, *extra):
    return subprocess.run([sys.executable, "-m", "pipeinfer.record.replicas", "--config", str(config_path), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def run_replica(cfg, tmp_path, replica, world=1):
    cfg = dict(cfg, replica=replica)
    results = launch(cfg, tmp_path, world)
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]


def read(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_two_replicas_merge_in_prompt_order_equal_to_generate(tiny_llama, tmp_path):
    out = tmp_path / "run.jsonl"
    cfg = base_config(tiny_llama, tmp_path, prompts=PROMPTS, replicas=2, output_path=str(out), max_new_tokens=6)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run_replica(cfg, tmp_path, 0)
    # one share missing: named, with the command that reruns only it; nothing written
    partial = merge(tmp_path / "cfg.json")
    assert partial.returncode == 75 and not out.exists(), partial.stderr
    assert "replicas 1 are incomplete" in partial.stderr and "--set replica=1" in partial.stderr.splitlines()[-1]
    run_replica(dict(cfg, pipeline_size=2), tmp_path, 1, world=2)  # a share may run at another geometry
    done = merge(tmp_path / "cfg.json")
    assert done.returncode == 0, done.stderr
    records = read(out)
    prompts = [r for r in records if r["type"] == "prompt"]
    assert [p["prompt_index"] for p in prompts] == list(range(len(PROMPTS)))
    assert [p["replica"] for p in prompts] == [0, 1, 0, 1, 0]
    assert [p["output_ids"] for p in prompts] == reference_outputs(tiny_llama, PROMPTS, 6)
    assert records[0]["type"] == "merge" and records[0]["replicas"] == 2
    assert [r["replica"] for r in records if r["type"] == "summary"] == [0, 1]
    # the report reads the merged file as replicas side by side: tokens/s summed, not one run's attempts
    s = summarize(load_run(str(out)))
    shares = [r for r in records if r["type"] == "summary"]
    assert s["tokens_per_s"] == pytest.approx(sum(r["new_tokens"] / r["wall_s"] for r in shares))
    assert s["prompts"] == 5 and [st["rank"] for st in s["stages"]] == [0] and "merged from 2 replicas" in s["notes"][0]
    # each replica's own file holds its share only
    assert [r["prompt_index"] for r in read(tmp_path / "run.replica1.jsonl") if r["type"] == "prompt"] == [1, 3]


def test_merge_refuses_shares_of_other_prompts_or_config(tiny_llama, tmp_path):
    out = tmp_path / "run.jsonl"
    cfg = base_config(tiny_llama, tmp_path, prompts=PROMPTS[:3], replicas=2, output_path=str(out), max_new_tokens=3)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run_replica(cfg, tmp_path, 0)
    run_replica(dict(cfg, prompts=PROMPTS[1:4]), tmp_path, 1)
    bad = merge(tmp_path / "cfg.json")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "ran other prompts" in bad.stderr and not out.exists()
    (tmp_path / "run.replica1.jsonl").unlink()
    run_replica(dict(cfg, max_new_tokens=2), tmp_path, 1)
    bad = merge(tmp_path / "cfg.json")
    assert bad.returncode == 2 and "max_new_tokens differ" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not out.exists()


def test_replica_out_of_range_is_one_line(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_path": "m", "prompts": ["a"], "replicas": 2, "replica": 2}))
    res = subprocess.run([sys.executable, "-m", "pipeinfer.config", str(cfg)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: replica=2 but replicas=2: replicas are numbered 0..1"


def test_submit_replicas_needs_two_replicas_one_line(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model_path": "m", "prompts": ["a"]}))
    res = subprocess.run(["bash", "submit_replicas.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "EXP_CONFIG": str(cfg), "HOST_PYTHON": sys.executable})
    assert res.returncode == 2 and res.stderr.strip() == (
        f"submit_replicas.sh: error: replicas=1 in {cfg}: set replicas >= 2 (--set replicas=4), or submit "
        f"submit.sbatch alone"), res.stderr
