"""Send/recv round trip over a real gloo process group, two processes.

    pytest tests/test_comm.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import base_config, free_port, launch
from pipeinfer.run.procgroup import p2p_backend
from pipeinfer.config import ConfigError


def _worker(rank: int, port: int, q) -> None:
    from pipeinfer.run import comm as pcomm
    from pipeinfer.run import procgroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    c = procgroup.init(rank, 2, torch.device("cpu"), timeout_s=30, master_port=port)
    try:
        h = torch.arange(2 * 3 * 4, dtype=torch.bfloat16).view(2, 3, 4)
        if rank == 0:
            c.send_hidden(h)
            c.send_control(pcomm.STOP, (2, 1, 4), torch.bfloat16)
            tokens, codes, stop, lp = c.recv_tokens(2, None, "test", n_floats=6)
            _, _, _, none = c.recv_tokens(2, None, "test")  # log-probabilities off: the token message only
            q.put(("tokens", tokens.tolist(), codes.tolist(), stop, lp.view(2, 3).tolist(), none, c.bytes_sent))
        else:
            got, control = c.recv_hidden((2, 3, 4), torch.bfloat16, "test")
            _, stopped = c.recv_hidden((2, 1, 4), torch.bfloat16, "test")
            c.send_tokens(torch.tensor([7, 9]), torch.tensor([0, 3]), True,
                          torch.tensor([[-0.5, 7.0, -0.25], [-1.5, 2.0, -0.125]]))  # (B, 1 + 2k), k = 1
            c.send_tokens(torch.tensor([1, 2]), torch.tensor([0, 0]), False)
            q.put(("hidden", torch.equal(got, h) and control == pcomm.CONTINUE, stopped == pcomm.STOP))
        assert c.all_ok(True) and not c.all_ok(rank == 0)
        assert c.broadcast({"from": rank}) == {"from": 0}
        gathered = c.gather(rank * 10)
        if rank == 0:
            q.put(("gather", gathered))
    finally:
        procgroup.shutdown()


def _start_pair(target):
    """Two spawned processes running target(rank, port, queue); returns them and the queue."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    return procs, q


def test_round_trip_over_gloo():
    procs, q = _start_pair(_worker)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = {m[0]: m[1:] for m in (q.get(timeout=5) for _ in range(3))}
    assert got["hidden"] == (True, True)
    tokens, codes, stop, lp, none, sent = got["tokens"]
    assert tokens == [7, 9] and codes == [0, 3] and stop is True and none is None
    assert lp == [[-0.5, 7.0, -0.25], [-1.5, 2.0, -0.125]]
    assert sent == (2 * 3 * 4 + 1 + 2 * 1 * 4 + 1) * 2  # two bf16 frames, each with its control element
    assert got["gather"] == ([0, 10],)


def test_backend_choice_from_placements():
    own_gpus = [("n1", "GPU-a", 0), ("n2", "GPU-b", 0)]      # one GPU per node, as on the cluster
    one_gpu = [("n1", "GPU-a", 0), ("n1", "GPU-a", 0)]       # two ranks on one GPU
    isolated = [("n1", "GPU-a", 0), ("n1", "GPU-b", 0)]      # one node, a GPU per task: both see cuda:0
    cpu = [("n1", None, None), ("n1", None, None)]
    assert p2p_backend("auto", own_gpus) == "nccl"
    assert p2p_backend("auto", isolated) == "nccl"
    assert p2p_backend("auto", one_gpu) == "gloo"  # NCCL cannot pair them: through host memory
    assert p2p_backend("auto", cpu) == "gloo"
    assert p2p_backend("gloo", own_gpus) == "gloo"
    assert p2p_backend("nccl", isolated) == "nccl"
    with pytest.raises(ConfigError, match=r"ranks \[0, 1\] share one GPU \(cuda:0\) on n1"):
        p2p_backend("nccl", one_gpu + [("n2", "GPU-c", 0)])
    with pytest.raises(ConfigError, match=r"rank\(s\) \[1\] run on CPU"):
        p2p_backend("nccl", [own_gpus[0], cpu[1]])


def test_nccl_without_gpus_exits_2_on_every_rank(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, comm_backend="nccl", device="cpu")
    results = launch(cfg, tmp_path, 2)
    assert [r.returncode for r in results] == [2, 2]
    for r in results:
        lines = r.stderr.strip().splitlines()
        assert lines[-1] == ('error: comm_backend="nccl" but rank(s) [0, 1] run on CPU: NCCL moves GPU tensors '
                             'only; use comm_backend="auto" or "gloo"'), r.stderr
        assert "Traceback" not in r.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_rendezvous_failure_is_one_line(tiny_llama, tmp_path):
    """Rank 1 started alone (rank 0 never comes): after timeout_s one line, exit 1, without the
    dozens of lines of C++ stack torch's c10d logs for each connection attempt."""
    import json

    from conftest import rank_env, run_rank

    (tmp_path / "cfg.json").write_text(json.dumps(base_config(tiny_llama, tmp_path, pipeline_size=2, timeout_s=3)))
    res = run_rank(["--config", str(tmp_path / "cfg.json")], rank_env(1, 2, free_port()), timeout=60)
    assert res.returncode == 1
    lines = [ln for ln in res.stderr.strip().splitlines() if not ln.startswith("[rank 1] INFO")]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1: could not join the 2 ranks at 127.0.0.1:"), \
        res.stderr
    assert "MASTER_ADDR and MASTER_PORT" in lines[0] and "frame #" not in res.stderr


def _dead_peer_worker(rank: int, port: int, q) -> None:
    import time

    from pipeinfer.run import comm as pcomm
    from pipeinfer.run import procgroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    c = procgroup.init(rank, 2, torch.device("cpu"), timeout_s=30, master_port=port)
    c.all_ok(True)
    if rank == 1:
        os._exit(0)  # gone without a word, as a killed rank is
    time.sleep(1.0)  # gloo has seen the connection close: posting a send now fails at once
    try:
        for step in range(50):
            c.send_hidden(torch.zeros(1, 1, 4), f"sending step {step}'s hidden states")
        c.drain_sends()
        q.put(("no error", None))
    except pcomm.PeerFailure as e:
        q.put(("PeerFailure", str(e)))
    except BaseException as e:  # what the runner would print as a traceback
        q.put((type(e).__name__, str(e)[:300]))
    q.close()
    q.join_thread()  # the message is out before os._exit
    os._exit(0)


def test_send_to_a_dead_peer_is_a_peer_failure():
    """gloo raises at isend itself (not only in wait) once the peer's connection is closed: seen in
    CI as a traceback where the one-line error was meant. Every post is now guarded like a wait."""
    procs, q = _start_pair(_dead_peer_worker)
    kind, msg = q.get(timeout=60)
    for p in procs:
        p.join(30)
    assert kind == "PeerFailure", (kind, msg)
    assert msg.startswith("sending step ") and "to rank 1" in msg and "rank 1 is gone" in msg, msg


def _float_count_worker(rank: int, port: int, q) -> None:
    from pipeinfer.run import comm as pcomm
    from pipeinfer.run import procgroup

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    c = procgroup.init(rank, 2, torch.device("cpu"), timeout_s=20, master_port=port)
    try:
        if rank == 1:
            c.send_tokens(torch.tensor([1, 2]), torch.tensor([0, 0]), False, torch.empty(2, 0))  # (B, T - 1 = 0)
            c.send_tokens(torch.tensor([3, 4]), torch.tensor([0, 2]), True, torch.tensor([-0.5, -0.25]))
            c.send_tokens(torch.tensor([5, 6]), torch.tensor([0, 0]), False, torch.zeros(4))  # rank 0 expects 6
            c.drain_sends()  # the 4 floats are never received: rank 0 leaves at the error
            q.put(("rank 1", "no error", None))
        else:
            first = c.recv_tokens(2, None, "test", n_floats=0)
            second = c.recv_tokens(2, None, "test", n_floats=2)
            q.put(("messages", first[0].tolist(), first[3], second[0].tolist(), second[1].tolist(), second[2],
                   second[3].tolist()))
            c.recv_tokens(2, None, "waiting for step 0's tokens from the last stage", n_floats=6)
            q.put(("rank 0", "no error", None))
    except pcomm.PeerFailure as e:
        q.put((f"rank {rank}", type(e).__name__, str(e)))
    finally:
        procgroup.shutdown(clean=False)


def test_float_count_is_checked_and_empty_float_messages_are_not_sent():
    """The token message says how many floats follow. An empty float message (one-token prompts
    with prompt_logprobs, no logprobs) is not sent, so the next message is read in its place, not
    one off; a count other than the receiver's is a one-line PipelineProtocolError on rank 0,
    before the floats are read, and rank 1's wait on it fails as a PeerFailure."""
    procs, q = _start_pair(_float_count_worker)
    got = {m[0]: m[1:] for m in (q.get(timeout=90) for _ in range(3))}
    for p in procs:
        p.join(60)
    assert got["messages"] == ([1, 2], None, [3, 4], [0, 2], True, [-0.5, -0.25])
    kind, msg = got["rank 0"]
    assert kind == "PipelineProtocolError", got
    assert msg == ("waiting for step 0's tokens from the last stage: pipeline protocol error: the last stage sent "
                   "4 log-probability values, this rank's schedule expects 6: the ranks disagree on the "
                   "micro-batch's shape or on logprobs/prompt_logprobs (a bug: report it with every rank's log)")
    kind, msg = got["rank 1"]
    assert kind == "PeerFailure" and "\n" not in msg and "rank 0" in msg, got


def test_a_post_that_fails_otherwise_names_its_error():
    """Only gloo's closed-connection error at the post means the peer is gone; any other error
    raised while posting (an NCCL communicator that cannot be made, CUDA out of memory) is named
    as it was raised, never blamed on the peer."""
    from pipeinfer.run import comm as pcomm

    def raising(e):
        def op(tensor, peer, group=None):
            raise e
        return op

    closed = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:52620. This is "
                          "typically caused by a remote worker crashing.")
    nccl = torch.distributed.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1935, unhandled cuda error "
                                              "(run with NCCL_DEBUG=INFO for details)\nlast error: ...")
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    msgs = {}
    for name, e in [("closed", closed), ("nccl", nccl), ("oom", oom)]:
        with pytest.raises(pcomm.PeerFailure) as info:
            pcomm._post(raising(e), torch.zeros(1), 1, None, "sending hidden states to rank 1")
        msgs[name] = str(info.value)
    assert "rank 1 is gone" in msgs["closed"], msgs
    for name, said in [("nccl", "DistBackendError: NCCL error in: ProcessGroupNCCL.cpp:1935, unhandled cuda error"),
                       ("oom", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")]:
        assert "gone" not in msgs[name] and said in msgs[name] and "\n" not in msgs[name], msgs[name]
        assert msgs[name].startswith("sending hidden states to rank 1: "), msgs[name]
