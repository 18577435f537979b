"""Send/recv round trip over a real gloo process group, two processes.

    pytest tests/test_comm.py
"""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from conftest import free_port


def _worker(rank: int, port: int, q) -> None:
    from pipeinfer import comm as pcomm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    c = pcomm.init(rank, 2, torch.device("cpu"), timeout_s=30, master_port=port)
    try:
        h = torch.arange(2 * 3 * 4, dtype=torch.bfloat16).view(2, 3, 4)
        if rank == 0:
            c.send_hidden(h)
            c.send_control(pcomm.STOP, (2, 1, 4), torch.bfloat16)
            tokens, stop = c.recv_tokens(2, None, "test")
            q.put(("tokens", tokens.tolist(), stop, c.bytes_sent))
        else:
            got, control = c.recv_hidden((2, 3, 4), torch.bfloat16, "test")
            _, stopped = c.recv_hidden((2, 1, 4), torch.bfloat16, "test")
            c.send_tokens(torch.tensor([7, 9]), True)
            q.put(("hidden", torch.equal(got, h) and control == pcomm.CONTINUE, stopped == pcomm.STOP))
        assert c.all_ok(True) and not c.all_ok(rank == 0)
        assert c.broadcast({"from": rank}) == {"from": 0}
        gathered = c.gather(rank * 10)
        if rank == 0:
            q.put(("gather", gathered))
    finally:
        pcomm.shutdown()


def test_round_trip_over_gloo():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    got = {m[0]: m[1:] for m in (q.get(timeout=5) for _ in range(3))}
    assert got["hidden"] == (True, True)
    tokens, stop, sent = got["tokens"]
    assert tokens == [7, 9] and stop is True
    assert sent == (2 * 3 * 4 + 1 + 2 * 1 * 4 + 1) * 2  # two bf16 frames, each with its control element
    assert got["gather"] == ([0, 10],)
