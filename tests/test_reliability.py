"""Faults and interruptions: nothing hangs, nothing recorded is lost or duplicated.

    pytest tests/test_reliability.py

Ranks run as plain processes with no torchrun supervising them, as srun starts them. Time
bounds are generous (timeout_s plus a margin) so a loaded 2-core machine cannot make them flake.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import (ENTRY, ROOT, base_config, run_rank, start_rank, free_port, prompt_records, rank_env, reference_outputs,
                      run_pipeline)

SLOW_PROMPTS = [f"prompt number {i}: " + "word " * (i % 3) for i in range(8)]
RUN = dict(prompts=SLOW_PROMPTS, max_new_tokens=200, ignore_eos=True, batch_size=1)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "slow"), seed=3, hidden_size=128,
                      intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)


def start(cfg: dict, tmp_path, world: int, env_for=None, wrap_rank=None) -> list[subprocess.Popen]:
    path = tmp_path / f"cfg-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(cfg))
    port = free_port()
    procs = []
    for r in range(world):
        env = rank_env(r, world, port)
        if wrap_rank and r in wrap_rank:
            procs.append(subprocess.Popen([sys.executable, "-c", wrap_rank[r], "--config", str(path)], cwd=ROOT,
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        else:
            procs.append(start_rank([ENTRY, "--config", str(path)], env))
    return procs


def wait_for_records(path: str, n: int, procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if sum('"type": "prompt"' in line for line in f) >= n:
                    return
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited early: " + " | ".join((p.communicate()[1] or "")[-800:] for p in procs))
        time.sleep(0.02)
    raise AssertionError(f"no {n} prompt records in {path} after {timeout}s")


def finish(p: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err, time.monotonic() - t0


def kill_all(procs):
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_peer_killed_or_stopped_ends_rank0_within_timeout(slow_model, tmp_path, how):
    timeout_s = 10
    cfg = base_config(slow_model, tmp_path, pipeline_size=2, timeout_s=timeout_s, **RUN)
    procs = start(cfg, tmp_path, 2)
    try:
        wait_for_records(cfg["output_path"], 1, procs)
        os.kill(procs[1].pid, getattr(signal, how))
        code, err, waited = finish(procs[0], timeout_s + 30)
        assert code == 1, err
        assert waited < timeout_s + 20
        msg = [line for line in err.splitlines() if line.startswith("error:")]
        # names the peer and what this rank was doing at the time
        assert len(msg) == 1 and "rank 1" in msg[0] and ("waiting for" in msg[0] or "sending" in msg[0]), err
        if how == "SIGSTOP":
            assert f"timeout_s={timeout_s}" in msg[0]
        assert "Traceback" not in err
    finally:
        kill_all(procs)


RAISE_MID_RUN = """
import runpy, sys, time
import pipeinfer.run.generation as g
import pipeinfer.run.rows as rows
real, calls = (g._step, rows.RowSchedule._visit), []
def failing(i):
    def step(*a, **k):
        calls.append(1)
        if len(calls) == 300:
            print(f"injected failure at {time.time()!r}", file=sys.stderr, flush=True)
            raise RuntimeError("injected failure on rank 1")
        return real[i](*a, **k)
    return step
g._step, rows.RowSchedule._visit = failing(0), failing(1)
runpy.run_path(%r, run_name="__main__")
""" % ENTRY


def exits(procs, timeout: float) -> list[tuple[int, str, float]]:
    """(exit code, stderr, wall-clock time.time() of the exit) of every process, waited for together."""
    import threading

    out = [None] * len(procs)

    def wait(i, p):
        _, err = p.communicate(timeout=timeout)
        out[i] = (p.returncode, err, time.time())

    threads = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert None not in out, "a rank did not exit in time"
    return out


@pytest.mark.parametrize("schedule", ["rows", "micro_batches"])
def test_exception_on_one_rank_ends_the_job_within_seconds(slow_model, tmp_path, schedule):
    cfg = base_config(slow_model, tmp_path, pipeline_size=3, timeout_s=300, schedule=schedule, **RUN)
    procs = start(cfg, tmp_path, 3, wrap_rank={1: RAISE_MID_RUN})
    try:
        codes = exits(procs, 240)
        assert all(code != 0 for code, _, _ in codes), [c for c, _, _ in codes]
        assert "injected failure on rank 1" in codes[1][1]
        failed_at = float(next(line for line in codes[1][1].splitlines()
                               if line.startswith("injected failure at ")).split()[-1])
        # Measured from the failure, not from process start: far below timeout_s=300, since the dead
        # rank's closed connections end the others at once.
        assert all(exited - failed_at < 30 for _, _, exited in codes), [exited - failed_at for _, _, exited in codes]
        assert "rank 1 is gone" in codes[0][1] or "rank 1 is gone" in codes[2][1]
    finally:
        kill_all(procs)


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def slow_reference(slow_model):
    """generate()'s tokens for SLOW_PROMPTS: what an interrupted and resumed run must still produce."""
    return reference_outputs(slow_model, SLOW_PROMPTS, RUN["max_new_tokens"], ignore_eos=True)


def test_killed_run_resumes_with_one_record_per_prompt(slow_model, slow_reference, tmp_path):
    cfg = base_config(slow_model, tmp_path, pipeline_size=2, **RUN)
    procs = start(cfg, tmp_path, 2)
    try:
        wait_for_records(cfg["output_path"], 2, procs)
    finally:
        kill_all(procs)
    before = [r for r in records(cfg["output_path"]) if r["type"] == "prompt"]
    assert 2 <= len(before) < len(SLOW_PROMPTS)
    with open(cfg["output_path"], "a") as f:
        f.write('{"type": "prompt", "prompt_index": 7, "outp')  # a write cut short by the kill

    resumed = run_pipeline(cfg, tmp_path, 2)
    prompts = [r for r in resumed if r["type"] == "prompt"]
    assert sorted(p["prompt_index"] for p in prompts) == list(range(len(SLOW_PROMPTS)))
    assert prompts[:len(before)] == before, "earlier records must stay as they were"
    assert [r["type"] for r in resumed].count("run") == 2

    assert [p["output_ids"] for p in prompt_records(resumed)] == slow_reference


@pytest.mark.parametrize("sig,to,in_flight", [("SIGTERM", "all", 1), ("SIGUSR1", "rank0", 1), ("SIGTERM", "all", 3)])
def test_signal_saves_finished_prompts_and_exits_75(slow_model, slow_reference, tmp_path, sig, to, in_flight):
    """With one micro-batch, or three in flight (frames on their way must drain cleanly)."""
    cfg = base_config(slow_model, tmp_path, pipeline_size=2,
                      **dict(RUN, batch_size=in_flight, micro_batch_size=1))
    procs = start(cfg, tmp_path, 2)
    try:
        wait_for_records(cfg["output_path"], 1, procs)
        for p in (procs if to == "all" else procs[:1]):
            os.kill(p.pid, getattr(signal, sig))
        codes = [finish(p, 60) for p in procs]
        assert [c for c, _, _ in codes] == [75, 75], [e[-500:] for _, e, _ in codes]
        assert "rerun the same config to resume" in codes[0][1]
    finally:
        kill_all(procs)
    recs = records(cfg["output_path"])
    assert recs[-1]["type"] == "summary" and recs[-1]["interrupted"] is True
    done = {r["prompt_index"] for r in recs if r["type"] == "prompt"}
    assert 1 <= len(done) < len(SLOW_PROMPTS)
    final = run_pipeline(cfg, tmp_path, 2)
    assert [p["output_ids"] for p in prompt_records(final)] == slow_reference  # every prompt, once, generate()'s


def test_corrupt_middle_line_refuses_to_start(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path)
    run_pipeline(cfg, tmp_path, 1)
    lines = open(cfg["output_path"]).read().splitlines()
    lines[1] = lines[1][:20]
    open(cfg["output_path"], "w").write("\n".join(lines) + "\n")
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    res = run_rank(["--config", str(tmp_path / "c.json")], rank_env(0, 1, free_port()), timeout=60)
    assert res.returncode == 2 and "line 2 is corrupt" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, "refused before loading anything"
    assert open(cfg["output_path"]).read().splitlines() == lines, "nothing may change in a file we refuse"


def test_resume_refuses_records_of_another_config(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path)
    run_pipeline(cfg, tmp_path, 1)
    (tmp_path / "c.json").write_text(json.dumps(dict(cfg, max_new_tokens=5)))
    res = run_rank(["--config", str(tmp_path / "c.json")], rank_env(0, 1, free_port()), timeout=60)
    assert res.returncode == 2 and "max_new_tokens differ" in res.stderr
    # batch_size and pipeline_size do not change outputs: a rerun with them changed has nothing to do
    again = run_pipeline(dict(cfg, batch_size=4), tmp_path, 1)
    assert len(prompt_records(again)) == len(cfg["prompts"])


def test_resume_with_another_batch_geometry_says_so_and_records_micro_batches(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, batch_size=2, schedule="micro_batches")
    first = run_pipeline(cfg, tmp_path, 1)
    assert [p["micro_batch"] for p in prompt_records(first)] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    kept = [r for r in first if r["type"] == "run"] + prompt_records(first)[:2]  # as if stopped after 2 prompts
    with open(cfg["output_path"], "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    res = run_single(dict(cfg, batch_size=1), tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming: 2 of 4 prompts" in res.stderr
    assert "the file now mixes micro-batch geometries (batch_size 2 -> 1)" in res.stderr
    with open(cfg["output_path"]) as f:
        got = prompt_records([json.loads(line) for line in f])
    assert [p["micro_batch"] for p in got] == [[0, 1], [0, 1], [2], [3]]
    assert [p["output_ids"] for p in got] == reference_outputs(tiny_llama, cfg["prompts"], cfg["max_new_tokens"])


def test_resume_false_moves_the_old_file_only_once_the_run_starts(tiny_llama, tmp_path):
    """The old file moved to .bak before the ranks agreed that every stage loaded, so a run that then
    failed to load had already moved the results away; and a second start-over replaced the first .bak."""
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    broken = broken_copy(tiny_llama, tmp_path, "broken")
    os.remove(os.path.join(broken, "model.safetensors"))
    failed = run_single(base_config(broken, tmp_path, resume=False), tmp_path)
    assert failed.returncode == 2 and "no model.safetensors" in failed.stderr
    assert out.read_text() == "earlier results\n" and not list(tmp_path.glob("out.jsonl.bak*"))
    cfg = base_config(tiny_llama, tmp_path, resume=False)
    for n in range(2):
        first = out.read_text()
        res = run_single(cfg, tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        backup = tmp_path / ("out.jsonl.bak" + (f".{n}" if n else ""))
        assert f"moved the existing {out} to {backup}" in res.stderr and backup.read_text() == first
    assert len(prompt_records([json.loads(line) for line in out.read_text().splitlines()])) == len(cfg["prompts"])


def broken_copy(model: str, tmp_path, name: str) -> str:
    import shutil

    path = str(tmp_path / name)
    shutil.copytree(model, path)
    return path


def run_single(cfg: dict, tmp_path) -> subprocess.CompletedProcess:
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    return run_rank(["--config", str(tmp_path / "c.json")], rank_env(0, 1, free_port()), timeout=120)


def error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "is corrupt"),
    ("missing config", "has no config.json"),
    ("missing tokenizer", "no usable tokenizer"),
    ("missing shard", "is missing"),
    ("missing tensor", "has no tensor for 1 weights rank 0 needs (model.layers.2.mlp.up_proj.weight)"),
])
def test_broken_checkpoint_is_one_line_error(tiny_llama, tmp_path, damage, needle):
    path = broken_copy(tiny_llama, tmp_path, "broken")
    weights = os.path.join(path, "model.safetensors")
    if damage == "truncate":
        os.truncate(weights, os.path.getsize(weights) // 2)
    elif damage == "missing config":
        os.remove(os.path.join(path, "config.json"))
    elif damage == "missing tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(path, name))
    elif damage == "missing tensor":  # a whole file, but one weight short: loading would make it up
        from safetensors.torch import load_file, save_file
        tensors = load_file(weights)
        del tensors["model.layers.2.mlp.up_proj.weight"]
        save_file(tensors, weights, metadata={"format": "pt"})
    else:  # a sharded checkpoint whose index names a shard that is not there
        from safetensors import safe_open
        with safe_open(weights, framework="pt") as f:
            names = list(f.keys())
        os.rename(weights, os.path.join(path, "model-00001-of-00002.safetensors"))
        weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
        weight_map[names[-1]] = "model-00002-of-00002.safetensors"
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    res = run_single(base_config(path, tmp_path), tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(error_lines(res)) == 1 and needle in error_lines(res)[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "out.jsonl") or "prompt" not in open(tmp_path / "out.jsonl").read()


def test_broken_shard_stops_every_rank(tiny_llama, tmp_path):
    """Every rank checks the shards before loading, so all exit 2 together instead of waiting on each other."""
    path = broken_copy(tiny_llama, tmp_path, "broken")
    weights = os.path.join(path, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 100)
    cfg = base_config(path, tmp_path, pipeline_size=2)
    from conftest import launch
    results = launch(cfg, tmp_path, 2, timeout=120)
    assert [r.returncode for r in results] == [2, 2]
    assert all(len(error_lines(r)) == 1 for r in results)


def test_non_utf8_prompts_file(tiny_llama, tmp_path):
    (tmp_path / "prompts.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=str(tmp_path / "prompts.txt"))
    res = run_single(cfg, tmp_path)
    assert res.returncode == 2 and "not UTF-8" in res.stderr and len(res.stderr.strip().splitlines()) == 1
