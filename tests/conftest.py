"""Shared fixtures: tiny random models written with save_pretrained, and a launcher that starts
real ranks as separate processes (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as srun starts them).

Ranks are forked from a server that has torch and transformers imported already (tests/zygote.py);
PIPEINFER_TEST_EXEC=1 starts each with a fresh interpreter instead."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "run_distributed_inference.py")
sys.path.insert(0, ROOT)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)

# .ci/run sets PIPEINFER_REQUIRE_ALL=1: there a test whose requirement is missing (root, iproute2, a
# wheel-building setuptools) fails instead of skipping, so CI cannot pass by skipping a path.
REQUIRE_ALL = os.environ.get("PIPEINFER_REQUIRE_ALL") == "1"


def require(problem: str | None) -> None:
    """Skip the calling test when `problem` (what is missing, and how to get it) is not None;
    fail it instead in CI (PIPEINFER_REQUIRE_ALL=1)."""
    if problem is None:
        return
    if REQUIRE_ALL:
        pytest.fail(f"{problem} (PIPEINFER_REQUIRE_ALL=1: this test must run here, not skip)")
    pytest.skip(problem)


PROMPTS = ["Hello", "The quick brown fox jumps over", "a", "Pipeline parallel inference, token for token."]


# The files whose tests mostly wait (on Slurm's scheduler and time limits, on network timeouts) go
# first: under pytest-xdist (make test) they then overlap with the rest instead of ending the run.
_WAITING_FIRST = ("test_slurm.py", "test_two_hosts.py", "test_reliability.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda it: _WAITING_FIRST.index(it.path.name) if it.path.name in _WAITING_FIRST
               else len(_WAITING_FIRST))  # stable: the rest keep their order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("PIPEINFER_NVTX", None)
    return env


class _Zygote:
    """The fork server of tests/zygote.py, started once per test process."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=dict(os.environ, PYTHONPATH=ROOT))
        self.lock = threading.Lock()

    def ask(self, **req) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the test fork server (tests/zygote.py) died: exit {self.proc.wait()}")
        return json.loads(line)


_zygote: _Zygote | None = None


class Rank:
    """A rank forked by the zygote, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, args: list[str], env: dict, cwd: str):
        global _zygote
        if _zygote is None:
            _zygote = _Zygote()
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="rank-io-")
        self.out, self.err = os.path.join(self.dir, "stdout"), os.path.join(self.dir, "stderr")
        self.pid = _zygote.ask(op="spawn", argv=args, env=env, cwd=cwd, out=self.out, err=self.err)["pid"]
        self.returncode = None
        self._output = None  # (stdout, stderr), read once the rank has exited

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = _zygote.ask(op="poll", pid=self.pid)["code"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        if self._output is None:
            with open(self.out, encoding="utf-8", errors="replace") as o, \
                    open(self.err, encoding="utf-8", errors="replace") as e:
                self._output = o.read(), e.read()
            shutil.rmtree(self.dir, ignore_errors=True)
        return self._output

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(9)


def start_rank(args: list[str], env: dict, cwd: str = ROOT):
    """Start the entry script (args[0]) as one rank: forked from the zygote, or exec'd with
    PIPEINFER_TEST_EXEC=1. Popen-like either way, text stdout/stderr."""
    if os.environ.get("PIPEINFER_TEST_EXEC") == "1":
        return subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return Rank(args, env, cwd)


def run_rank(args: list[str], env: dict, timeout: float = 120, cwd: str = ROOT) -> subprocess.CompletedProcess:
    """One process of the entry script to its end, like subprocess.run(capture_output=True, text=True)."""
    p = start_rank([ENTRY, *args], env, cwd)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
    return subprocess.CompletedProcess([sys.executable, ENTRY, *args], p.returncode, out, err)


def launch(config: dict, tmp_path, world: int, timeout: float = 240, extra_args=()) -> list[subprocess.CompletedProcess]:
    """Write config, start `world` rank processes, wait for all; returns their CompletedProcess."""
    path = tmp_path / f"config-{world}.json"
    path.write_text(json.dumps(config))
    port = free_port()
    procs = [start_rank([ENTRY, "--config", str(path), *extra_args], rank_env(r, world, port))
             for r in range(world)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def run_pipeline(config: dict, tmp_path, world: int, **kw) -> list[dict]:
    """Run and return the JSONL records; fails the test with every rank's stderr if a rank failed."""
    results = launch(config, tmp_path, world, **kw)
    bad = [(r, res) for r, res in enumerate(results) if res.returncode != 0]
    assert not bad, "\n".join(f"rank {r} exit {res.returncode}:\n{res.stderr[-3000:]}" for r, res in bad)
    with open(config["output_path"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def prompt_records(records: list[dict]) -> list[dict]:
    return sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])


def reference_outputs(model_path: str, prompts: list[str], max_new_tokens: int,
                      ignore_eos: bool = False, **model_kwargs) -> list[list[int]]:
    """Whole-model transformers generate(), greedy, one prompt at a time: the ids after the prompt.
    ignore_eos: decode past EOS, as the runner's ignore_eos does (generate() with no EOS id).
    model_kwargs: for from_pretrained (quantization_config=BitsAndBytesConfig(...), device_map="cpu":
    the whole model quantized by transformers)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32,
                                                 **model_kwargs)
    model.eval()
    if ignore_eos:  # a None passed to generate() would fall back to the model's own generation_config
        model.generation_config.eos_token_id = None
    outs = []
    for p in prompts:
        enc = tok(p, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id)
        outs.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return outs


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "llama5"), seed=1, **TINY)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "llama4-tied"), seed=2, tie_word_embeddings=True,
                      **dict(TINY, num_hidden_layers=4))


def set_eos_token(path: str, eos: int) -> None:
    """Make `eos` the checkpoint's EOS id, in config.json and generation_config.json alike."""
    for name in ("config.json", "generation_config.json"):
        with open(os.path.join(path, name)) as f:
            data = json.load(f)
        data["eos_token_id"] = eos
        with open(os.path.join(path, name), "w") as f:
            json.dump(data, f)


def base_config(model: str, tmp_path, **over) -> dict:
    cfg = dict(model_path=model, pipeline_size=1, prompts=PROMPTS, max_new_tokens=12, batch_size=2,
               output_path=str(tmp_path / "out.jsonl"), offload_folder=str(tmp_path / "offload"), timeout_s=120)
    cfg.update(over)
    return cfg
