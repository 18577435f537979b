"""The CUDA and NCCL paths, checked on CPU: where a GPU is needed, torch.cuda's functions are
replaced by fakes named as such (fake_capability, FakeStream, ...). Plus real 2-rank gloo runs for
the link warm-up and the non-finite logits check.

    pytest tests/test_cuda_path.py
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from conftest import PROMPTS, base_config, launch, prompt_records, reference_outputs, run_pipeline
from pipeinfer.run import comm as pcomm
from pipeinfer.run import procgroup
from pipeinfer.record import metrics
from pipeinfer.run.runtime import native_bf16, resolve_dtype
from pipeinfer.record.timeline import Timeline

CUDA0 = torch.device("cuda", 0)


# -- 1. dtype "auto" on CUDA: bf16 only where the GPU computes it natively ------------------------

@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_dtype_follows_compute_capability(monkeypatch, capability, expected):
    def fake_capability(device=None):
        return capability

    def fake_is_bf16_supported(including_emulation=True):  # torch >= 2.3 answers True on a T4 by default
        return True if including_emulation else capability >= (8, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", fake_capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake_is_bf16_supported)
    monkeypatch.setattr(torch.version, "hip", None)
    assert native_bf16(CUDA0) is (expected is torch.bfloat16)
    assert resolve_dtype("auto", CUDA0) is expected
    assert resolve_dtype("auto", CUDA0, saved="bfloat16") is expected  # the checkpoint's dtype does not decide on CUDA
    assert resolve_dtype("float32", CUDA0) is torch.float32


def test_bench_scripts_ask_resolve_dtype():
    """bench/throughput.py and bench/gpu_check.sh decide as the runner does, not by is_bf16_supported()."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("throughput.py", "gpu_check.sh"):
        with open(os.path.join(root, "bench", name), encoding="utf-8") as f:
            text = f.read()
        assert "is_bf16_supported()" not in text, name
        assert "resolve_dtype" in text or "native_bf16" in text, name


# -- 2. NCCL waits bounded: blocking-wait mode set before the NCCL group is made ------------------

def test_nccl_group_is_made_in_blocking_wait_mode(monkeypatch):
    """comm.init with two GPU ranks: the fakes stand in for the gloo rendezvous (one rank of two)
    and for the NCCL group, which records the environment it was created in."""
    for name in procgroup.NCCL_BLOCKING_WAIT:
        monkeypatch.setenv(name, "0")  # also restored after the test
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    seen = {}

    def fake_init_process_group(backend, rank, world_size, timeout):
        seen["default"] = backend

    def fake_all_gather_object(out, obj):  # two ranks, each with a GPU of its own
        out[:] = [("n1", "GPU-a", 0), ("n2", "GPU-b", 0)]

    def fake_new_group(backend, timeout):
        seen["nccl"] = (backend, timeout, {k: os.environ.get(k) for k in procgroup.NCCL_BLOCKING_WAIT})
        return "fake-nccl-group"

    monkeypatch.setattr(dist, "init_process_group", fake_init_process_group)
    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    monkeypatch.setattr(dist, "new_group", fake_new_group)
    monkeypatch.setattr(procgroup, "_placement", lambda device: ("n1", "GPU-a", 0))
    c = procgroup.init(0, 2, CUDA0, 7.0, 29999, Timeline(), "auto")
    assert seen["default"] == "gloo" and c.backend == "nccl" and c.group == "fake-nccl-group"
    backend, timeout, env = seen["nccl"]
    assert backend == "nccl" and timeout == datetime.timedelta(seconds=7)
    assert env == {"TORCH_NCCL_BLOCKING_WAIT": "1", "NCCL_BLOCKING_WAIT": "1"}


def test_wait_timeout_is_one_line_peer_failure():
    """What a blocking-mode NCCL wait raises on timeout becomes the same PeerFailure as over gloo."""
    class FakeTimedOutWork:  # stands in for a WorkNCCL in blocking-wait mode
        def wait(self, timeout):
            raise RuntimeError("[Rank 1] Work WorkNCCL(SeqNum=3, OpType=RECV) timed out in blocking wait "
                               "(TORCH_NCCL_BLOCKING_WAIT=1).\nException raised from ...")

    with pytest.raises(pcomm.PeerFailure, match=r"^waiting: rank 0 did not answer within timeout_s=5 "):
        pcomm._wait(FakeTimedOutWork(), 5.0, "waiting", 0)


# -- 3. compute spans synchronise the compute stream, never the whole device ---------------------

def test_compute_span_syncs_the_current_stream_only(monkeypatch):
    calls = []

    class FakeStream:  # stands in for torch.cuda.current_stream()'s stream
        def synchronize(self):
            calls.append("stream")

    def fake_current_stream(device=None):
        calls.append(("current_stream", device))
        return FakeStream()

    def fake_device_synchronize(device=None):
        raise AssertionError("torch.cuda.synchronize() waits for NCCL's streams too")

    monkeypatch.setattr(torch.cuda, "current_stream", fake_current_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", fake_device_synchronize)
    tl = Timeline(CUDA0)
    for kind in ("send", "recv"):
        with tl.span(kind):
            pass
    assert calls == []  # communication spans never synchronise
    with tl.span("decode"):
        pass
    assert calls == [("current_stream", CUDA0), "stream"]


# -- 5. GPU memory: peaks after warm-up, reserved and device-used too, named apart from CPU RSS ---

def test_memory_record_names_gpu_and_cpu_fields(monkeypatch):
    state = {"allocated": 5 << 30, "reserved": 6 << 30}

    def fake_reset_peak_memory_stats(device=None):
        state.update(allocated=2 << 30, reserved=3 << 30)  # what remains allocated after warm-up

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", fake_reset_peak_memory_stats)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: state["reserved"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 << 30, 80 << 30))  # fake: (free, total)
    metrics.reset_peak_memory(CUDA0)
    rec = metrics.memory_record(CUDA0)
    assert rec["gpu_peak_allocated_bytes"] == 2 << 30 and rec["peak_memory_bytes"] == 2 << 30
    assert rec["gpu_peak_reserved_bytes"] == 3 << 30
    assert rec["gpu_used_bytes"] == 10 << 30 and rec["gpu_total_bytes"] == 80 << 30
    assert rec["cpu_peak_rss_bytes"] > 0
    on_cpu = metrics.memory_record(torch.device("cpu"))
    assert on_cpu["peak_memory_bytes"] == on_cpu["cpu_peak_rss_bytes"] > 0
    assert not any(k.startswith("gpu_") for k in on_cpu)


# -- 4. links warmed before the clock (real ranks over gloo), output still generate()'s ------------

def test_links_warmed_before_the_measured_run(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=3, max_new_tokens=6)
    records = run_pipeline(cfg, tmp_path, 3)
    ref = reference_outputs(tiny_llama, PROMPTS, 6)
    assert [p["output_ids"] for p in prompt_records(records)] == ref
    stages = [r for r in records if r["type"] == "stage"]
    assert len(stages) == 3
    for st in stages:
        first_event = min(a for _, a, _ in st["events"])
        assert st["links_warmed_at"] is not None and st["links_warmed_at"] <= first_event, st["rank"]
        assert st["cpu_peak_rss_bytes"] > 0


# -- 6. non-finite logits: one line, exit 1 on every rank, no hang --------------------------------

@pytest.fixture(scope="module")
def overflowing_model(tmp_path_factory):
    """A tiny model whose lm_head holds an inf weight: every logits row has inf or NaN in it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import TINY
    from pipeinfer.models.tiny import make_model

    src = make_model(str(tmp_path_factory.mktemp("models") / "src"), seed=3, **dict(TINY, num_hidden_layers=2))
    model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight[7, 0] = float("inf")
    out = str(tmp_path_factory.mktemp("models") / "overflow")
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(src, local_files_only=True).save_pretrained(out)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_non_finite_logits_fail_with_one_line(overflowing_model, tmp_path, world):
    cfg = base_config(overflowing_model, tmp_path, pipeline_size=world, max_new_tokens=4, timeout_s=60)
    results = launch(cfg, tmp_path, world, timeout=120)
    assert [r.returncode for r in results] == [1] * world, [r.stderr[-1500:] for r in results]
    last = [ln for ln in results[-1].stderr.splitlines() if ln.startswith("error:")]
    assert len(last) == 1, results[-1].stderr[-2000:]
    assert f"error: rank {world - 1}: step 0: the logits for prompt 0 are not finite" in last[0]
    assert 'dtype="float32"' in last[0] and "bfloat16" in last[0]
    for r in results:
        assert "Traceback" not in r.stderr, r.stderr[-2000:]
    if world == 2:  # rank 0 sees its peer gone and says so in one line
        first = [ln for ln in results[0].stderr.splitlines() if ln.startswith("error:")]
        assert len(first) == 1 and "rank 1" in first[0], results[0].stderr[-2000:]


# -- the GPU check: on a machine without a GPU it stops at its software check, in seconds ---------

def test_gpu_check_dry_run_stops_with_one_line(tmp_path):
    import resource
    import subprocess
    import sys

    from conftest import ROOT

    # python3 is this venv's (torch present, no GPU): the check must get past the package checks
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               CUDA_VISIBLE_DEVICES="")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), str(tmp_path / "out")], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds, not wall: on a shared machine importing torch can take 20 s of waiting
    took = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    lines = (res.stdout + res.stderr).splitlines()
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(lines) == 1 and lines[0].startswith("error: torch ") and "sees no GPU" in lines[0], lines
    assert took < 15, took  # about 2.5 s: the import of torch
    assert not os.path.exists(tmp_path / "out" / "smoke.json")
