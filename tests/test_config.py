"""Config validation: every bad input exits 2 with one line naming the key, before any process group.

    pytest tests/test_config.py
"""

from __future__ import annotations

import collections
import json
import os

import pytest

from conftest import base_config, rank_env, run_rank
from pipeinfer.config import ConfigError, build_config, parse_override
from pipeinfer.run.prompts import Batch


def run_entry(cfg, tmp_path, world=1, raw: str | None = None, args=(), rank=0):
    path = tmp_path / "cfg.json"
    path.write_text(raw if raw is not None else json.dumps(cfg))
    env = rank_env(rank, world, 1)  # port 1: nothing may connect anywhere before the checks pass
    return run_rank(["--config", str(path), *args], env, timeout=60)


BAD = [
    ("unknown key", {"pipline_size": 2}, "pipline_size"),
    ("pipeline_size 0", {"pipeline_size": 0}, "pipeline_size"),
    ("pipeline_size > layers", {"pipeline_size": 6}, "num_hidden_layers=5"),
    ("dtype not allowed", {"dtype": "float8"}, "dtype"),
    ("empty prompts", {"prompts": []}, "prompts"),
    ("negative max_new_tokens", {"max_new_tokens": -1}, "max_new_tokens"),
    ("wrong type", {"batch_size": "4"}, "batch_size"),
    ("bool is not a number", {"batch_size": True}, "batch_size"),
    ("top_p > 1", {"top_p": 1.5}, "top_p"),
    ("temperature 0", {"temperature": 0}, "temperature"),
    ("temperature below the floor", {"do_sample": True, "temperature": 1e-40}, "temperature=1e-40 is out of range"),
    ("model_path missing dir", {"model_path": "/nonexistent/model"}, "model_path"),
    ("backend unknown", {"comm_backend": "mpi"}, "comm_backend"),
    ("max_memory infinite", {"max_memory": ["inf"]}, "max_memory"),
    ("timeout_s beyond timedelta", {"timeout_s": 1e300}, "timeout_s"),
    ("prompt with a lone surrogate", {"prompts": ["ab\ud800cd"]}, "prompt 0 is not valid Unicode"),
    ("no prompts for the batch runner", {"prompts": None}, "set one of prompts (a list of strings) or prompts_file"),
    ("max_prompt_tokens 0", {"max_prompt_tokens": 0}, "max_prompt_tokens=0 is out of range"),
    ("a prompt above max_prompt_tokens", {"max_prompt_tokens": 4}, "above max_prompt_tokens=4: raise"),
]


@pytest.mark.parametrize("name,over,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_config_exits_2_with_one_line(tiny_llama, tmp_path, name, over, needle):
    cfg = base_config(tiny_llama, tmp_path, **over)
    world = 6 if name == "pipeline_size > layers" else 1  # so that only the layer check can fail
    res = run_entry(cfg, tmp_path, world=world)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_model_path_key(tmp_path):
    res = run_entry({"prompts": ["x"]}, tmp_path)
    assert res.returncode == 2 and res.stderr.strip() == \
        "error: model_path is missing: set it to a local model directory (weights are never downloaded)"


def test_pipeline_size_differs_from_world_size(tiny_llama, tmp_path):
    res = run_entry(base_config(tiny_llama, tmp_path, pipeline_size=2), tmp_path, world=3)
    assert res.returncode == 2
    assert "pipeline_size=2 but WORLD_SIZE=3" in res.stderr and "--nproc-per-node=2" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_unparsable_json(tmp_path):
    res = run_entry(None, tmp_path, raw='{"model_path": "x",, }')
    assert res.returncode == 2 and "not valid JSON" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_bad_set_override_names_the_key(tiny_llama, tmp_path):
    res = run_entry(base_config(tiny_llama, tmp_path), tmp_path, args=["--set", "top_k=-3"])
    assert res.returncode == 2 and "top_k=-3" in res.stderr


def test_parse_override_json_or_string():
    assert parse_override("pipeline_size=2") == ("pipeline_size", 2)
    assert parse_override("model_path=/models/opt") == ("model_path", "/models/opt")
    assert parse_override('prompts=["hi","yo"]') == ("prompts", ["hi", "yo"])
    assert parse_override("ignore_eos=true") == ("ignore_eos", True)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("pipeline_size")


def test_build_config_defaults_and_types():
    cfg = build_config({"model_path": "m", "prompts": ["a"], "temperature": 1})
    assert cfg.pipeline_size == 1 and cfg.temperature == 1.0 and isinstance(cfg.temperature, float)
    with pytest.raises(ConfigError, match="exactly one of prompts"):
        build_config({"model_path": "m", "prompts": ["a"], "prompts_file": "p.txt"})
    with pytest.raises(ConfigError, match="did you mean 'max_new_tokens'"):
        build_config({"model_path": "m", "prompts": ["a"], "max_new_token": 3})


def test_prompts_file_formats(tiny_llama, tmp_path):
    from pipeinfer.run.prompts import load_prompts

    def load(name):
        return [spec.given for spec in load_prompts(build_config({"model_path": "m",
                                                                   "prompts_file": str(tmp_path / name)}))]

    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n\n{"prompt": "two"}\n')
    (tmp_path / "p.txt").write_text("alpha\n\nbeta\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert load("p.jsonl") == ["one", "two"]
    assert load("p.txt") == ["alpha", "beta"]
    with pytest.raises(ConfigError, match="not UTF-8"):
        load("latin1.txt")
    # a byte-order mark is not text; lines end at \n, \r\n or \r, never at U+2028 or a form feed
    (tmp_path / "bom.txt").write_bytes("\ufeffHello\r\nWorld\rAgain".encode("utf-8"))
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"prompt": "Hello"}\n'.encode("utf-8"))
    (tmp_path / "breaks.txt").write_bytes("page\x0cfeed\nA\u2028B\x85C\n".encode("utf-8"))
    (tmp_path / "ls.jsonl").write_bytes((json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n").encode("utf-8"))
    assert load("bom.txt") == ["Hello", "World", "Again"]
    assert load("bom.jsonl") == ["Hello"]
    assert load("breaks.txt") == ["page\x0cfeed", "A\u2028B\x85C"]
    assert load("ls.jsonl") == ["a\u2028b"]
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "x\\udc00"}\n')
    with pytest.raises(ConfigError, match="prompt 0 is not valid Unicode"):
        load("surrogate.jsonl")
    with pytest.raises(ConfigError, match="cannot be read"):
        load(".")  # a directory



def test_prompts_file_kind_by_suffix_any_case_or_content(tiny_llama, tmp_path):
    """A .JSONL file is JSON lines like a .jsonl one (not each line a prompt); a .json file, or JSON
    lines under another name, is refused with the fix, at the entry script as one line, exit 2."""
    from pipeinfer.run.prompts import load_prompts

    def load(name):
        return load_prompts(build_config({"model_path": "m", "prompts_file": str(tmp_path / name)}))

    line = json.dumps({"prompt": "one", "stop": ["x"]}) + "\n"
    (tmp_path / "p.JSONL").write_text(line)
    (tmp_path / "p.json").write_text(line)
    (tmp_path / "p.ndjson").write_text(line)
    specs = load("p.JSONL")
    assert [s.given for s in specs] == ["one"] and specs[0].settings == {"stop": ["x"]}
    with pytest.raises(ConfigError, match=r"p.json.* is a \.json file: .*one JSON object per line.*\.jsonl"):
        load("p.json")
    with pytest.raises(ConfigError, match=r"p.ndjson.* line 1 is a JSON object with a \"prompt\".*\.jsonl"):
        load("p.ndjson")
    res = run_entry(base_config(tiny_llama, tmp_path, prompts=None, prompts_file=str(tmp_path / "p.json")), tmp_path)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and ".json file" in lines[0], res.stderr


@pytest.mark.parametrize("path,needle", [("newdir/", "is a directory"), ("/dev/null", "not a regular file")])
def test_output_path_that_is_no_file(tiny_llama, tmp_path, path, needle):
    out = path if path.startswith("/") else f"{tmp_path}/{path}"  # (pathlib would drop the trailing slash)
    res = run_entry(base_config(tiny_llama, tmp_path, output_path=out), tmp_path)
    assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_config_file_that_is_a_directory(tmp_path):
    res = run_rank(["--config", str(tmp_path)], rank_env(0, 1, 1), timeout=60)
    assert res.returncode == 2 and "cannot be read (Is a directory)" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("rank,world", [(1, 1), (-1, 1), (2, 2)])
def test_rank_outside_world_size(tiny_llama, tmp_path, rank, world):
    res = run_entry(base_config(tiny_llama, tmp_path, pipeline_size=world), tmp_path, world=world, rank=rank)
    assert res.returncode == 2 and f"RANK={rank} with WORLD_SIZE={world}" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_prompt_too_long_for_model(tiny_llama, tmp_path):
    res = run_entry(base_config(tiny_llama, tmp_path, prompts=["x" * 250], max_new_tokens=10), tmp_path)
    assert res.returncode == 2 and "exceeds the model's 256 positions" in res.stderr


def test_unwritable_output_path(tiny_llama, tmp_path):
    (tmp_path / "file").write_text("")
    res = run_entry(base_config(tiny_llama, tmp_path, output_path=str(tmp_path / "file" / "out.jsonl")), tmp_path)
    assert res.returncode == 2 and "not writable" in res.stderr and "Traceback" not in res.stderr


def test_generation_config_settings_that_change_scores():
    from transformers import GenerationConfig

    from pipeinfer.run.sampling import score_settings

    assert score_settings(GenerationConfig()) == {}
    assert score_settings(GenerationConfig(temperature=0.7, top_p=0.9, do_sample=True)) == {}  # exp_config's job
    assert score_settings(GenerationConfig(repetition_penalty=1.05, suppress_tokens=[3])) == \
        {"repetition_penalty": 1.05, "suppress_tokens": [3]}
    neutral = GenerationConfig(repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, remove_invalid_values=False)
    assert score_settings(neutral) == {}  # spelled out in many generation_config.json files
    assert score_settings(GenerationConfig(encoder_repetition_penalty=1.2)) == {"encoder_repetition_penalty": 1.2}
    with pytest.raises(ConfigError, match="guidance_scale=1.5, which this runner cannot apply"):
        score_settings(GenerationConfig(guidance_scale=1.5))


def test_one_stage_never_touches_offload_folder(tiny_llama, tmp_path):
    """pipeline_size 1 offloads nothing, so an offload_folder it could not create does not matter."""
    (tmp_path / "file").write_text("")
    cfg = base_config(tiny_llama, tmp_path, offload_folder=str(tmp_path / "file" / "offload"))
    res = run_entry(cfg, tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]


def test_first_line_of_an_empty_message():
    from pipeinfer.config import first_line

    assert first_line(OSError("")) == "OSError"
    assert first_line(RuntimeError("\n  \nreal cause\nC++ stack")) == "real cause"
    assert first_line(ValueError("x" * 300), 120) == "x" * 120


def test_errors_with_empty_messages_stay_one_line(tiny_llama, tmp_path, monkeypatch):
    """An exception with no message (str(e) == "") once made `str(e).splitlines()[0]` raise
    IndexError: a traceback where a one-line error was meant."""
    import transformers

    from pipeinfer.plan.checkpoint import _read_shard
    from pipeinfer.run.prompts import load_tokenizer
    from pipeinfer.plan.model import read_model_config

    def fail(*args, **kwargs):
        raise OSError()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    with pytest.raises(ConfigError, match=r"no usable tokenizer .*\(OSError\)"):
        load_tokenizer(tiny_llama)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fail)
    with pytest.raises(ConfigError, match=r"config.json cannot be read \(OSError\)"):
        read_model_config(tiny_llama)
    monkeypatch.setattr(os.path, "getsize", fail)  # a stand-in for an I/O error without a message
    with pytest.raises(ConfigError, match=r"is corrupt \(OSError\)"):
        _read_shard(f"{tiny_llama}/model.safetensors")


@pytest.mark.parametrize("batch_size,pipeline_size,micro_batch_size,slots", [
    (1, 1, "auto", [1]), (8, 1, "auto", [8]), (4, 2, "auto", [2, 2]), (3, 2, "auto", [2, 1]),
    (5, 4, "auto", [2, 1, 1, 1]), (2, 4, "auto", [1, 1]), (4, 2, 3, [2, 2]), (4, 1, 3, [2, 2]),
    (7, 3, 2, [2, 2, 2, 1]), (12, 3, 1, [1] * 12), (6, 2, 6, [6])])
def test_micro_batching_never_puts_more_than_batch_size_in_flight(batch_size, pipeline_size, micro_batch_size,
                                                                    slots):
    """batch_size 3 at pipeline_size 2 once ran 2 micro-batches of 2 (4 in flight), 5 at 4 ran 6,
    and batch_size 4 with micro_batch_size 3 ran 6."""
    from pipeinfer.config import micro_batching
    from pipeinfer.run.prompts import MicroBatches

    cfg = build_config(dict(model_path="m", prompts=["p"], batch_size=batch_size, pipeline_size=pipeline_size,
                            micro_batch_size=micro_batch_size))
    got = micro_batching(cfg)
    assert got == slots and sum(got) == batch_size and max(got) - min(got) <= 1
    if isinstance(micro_batch_size, int):
        assert max(got) <= micro_batch_size
    # Counted in flight: every slot full, then one finishes and refills, until the prompts run out.
    work = MicroBatches(collections.deque(range(3 * batch_size + 1)), got, lambda idx: Batch(idx, None, None, []))
    running = {k: work.take(k) for k in range(len(got))}
    while running:
        assert work.in_flight == sum(len(b.indices) for b in running.values()) <= batch_size
        k, batch = running.popitem()
        work.done(batch)
        if (nxt := work.take(k)) is not None:
            running[k] = nxt
    assert work.max_in_flight == batch_size and work.in_flight == 0 and not work.todo


def test_plan_room_without_prompts(tiny_llama, tmp_path):
    """An engine's caller (a server, an evaluation) configures no prompts: the plan, and the dry run,
    make room for max_prompt_tokens, else the model's positions less max_new_tokens."""
    from transformers import AutoConfig

    from pipeinfer.plan.__main__ import dry_run

    positions = AutoConfig.from_pretrained(tiny_llama).max_position_embeddings
    cfg = build_config(base_config(tiny_llama, tmp_path, prompts=None, max_new_tokens=8, max_prompt_tokens=20))
    assert (dry_run(cfg)["longest_prompt"], dry_run(cfg)["capacity"]) == (20, 28)
    cfg = build_config(base_config(tiny_llama, tmp_path, prompts=None, max_new_tokens=8))
    assert dry_run(cfg)["capacity"] == positions
    with pytest.raises(ConfigError, match=f"exceeds the model's {positions} positions: lower one of them"):
        dry_run(build_config(base_config(tiny_llama, tmp_path, prompts=None, max_prompt_tokens=positions)))
