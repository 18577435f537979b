"""Per-prompt limits from a .jsonl prompts file (max_new_tokens, temperature, top_p, top_k, seed):
each prompt's greedy tokens equal whole-model generate() with its own max_new_tokens; bad values
end the job with one line, exit 2.

    pytest tests/test_limits.py
"""

from __future__ import annotations

import json

import pytest

from conftest import PROMPTS, base_config, prompt_records, rank_env, reference_outputs, run_pipeline, run_rank

MAX_NEW = [3, 12, 1, 7]  # very different per prompt; the run's own max_new_tokens is 5


def _jsonl(tmp_path, rows: list[dict]) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("pipeline_size,batch_size,micro_batch_size", [(1, 4, "auto"), (2, 4, 4), (3, 2, 1)])
def test_per_prompt_max_new_tokens_match_generate(tiny_llama, tmp_path, pipeline_size, batch_size, micro_batch_size):
    rows = [{"prompt": p, "max_new_tokens": n} for p, n in zip(PROMPTS, MAX_NEW)]
    rows.append({"prompt": "no limit of its own"})
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path, rows), max_new_tokens=5,
                      pipeline_size=pipeline_size, batch_size=batch_size, micro_batch_size=micro_batch_size)
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    got = prompt_records(records)
    want = [reference_outputs(tiny_llama, [r["prompt"]], r.get("max_new_tokens", 5))[0] for r in rows]
    assert [p["output_ids"] for p in got] == want
    assert [len(w) for w in want] == MAX_NEW + [5], "the tiny model should not hit EOS here"
    assert all(p["finish_reason"] == "length" for p in got)


def test_per_prompt_seed_and_sampling(tiny_llama, tmp_path):
    """A prompt with its own seed samples the same tokens wherever it sits in the input and at any
    pipeline or batch size; another temperature on one line changes that line only."""
    base = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_new_tokens=10)
    rows = [{"prompt": PROMPTS[1], "seed": 7}, {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[3], "temperature": 3.0,
                                                                         "top_k": 0, "top_p": 1.0}]
    one = prompt_records(run_pipeline(base_config(tiny_llama, tmp_path / "1", prompts=None, batch_size=3,
                                                  prompts_file=_jsonl(tmp_path, rows), **base), tmp_path, 1))
    moved = [{"prompt": PROMPTS[2]}, rows[0], {"prompt": PROMPTS[3]}]
    (tmp_path / "m").mkdir()
    two = prompt_records(run_pipeline(base_config(tiny_llama, tmp_path / "2", prompts=None, pipeline_size=2,
                                                  batch_size=1, prompts_file=_jsonl(tmp_path / "m", moved), **base),
                                      tmp_path, 2))
    assert one[0]["output_ids"] == two[1]["output_ids"], "a prompt's own seed: the same tokens anywhere"
    assert one[2]["output_ids"] != two[2]["output_ids"], "its own temperature changes the tokens"
    assert one[0]["output_ids"] != reference_outputs(tiny_llama, [PROMPTS[1]], 10)[0]


BAD = [
    ("max_new_tokens below 0", {"max_new_tokens": -1}, "line 2: max_new_tokens=-1 is out of range"),
    ("temperature of the wrong type", {"temperature": "hot"}, 'line 2: temperature="hot" has the wrong type'),
    ("top_p out of range", {"top_p": 1.5}, "line 2: top_p=1.5 is out of range"),
    ("temperature with greedy", {"temperature": 0.5}, "prompt 1 sets temperature but do_sample=false"),
    ("max_new_tokens 0 without scoring", {"max_new_tokens": 0}, "prompt 1: max_new_tokens=0 generates nothing"),
]


@pytest.mark.parametrize("name,line,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_per_prompt_limit_exits_2_with_one_line(tiny_llama, tmp_path, name, line, needle):
    pfile = _jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b", **line}])
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=pfile)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    rank = [b[0] for b in BAD].index(name) % 2
    res = run_rank(["--config", str(tmp_path / "cfg.json"), "--set", "pipeline_size=2"], rank_env(rank, 2, 1),
                   timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out.jsonl").exists()


def test_plan_sizes_kv_for_the_largest_per_prompt_max_new_tokens(tiny_llama, tmp_path):
    from pipeinfer.run.inputs import read_inputs

    pfile = _jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b", "max_new_tokens": 40}])
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=pfile, max_new_tokens=5)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    inputs = read_inputs(str(tmp_path / "cfg.json"), [])
    longest = max(len(p.ids) for p in inputs.prompts)
    assert inputs.plan.capacity == longest + 40
