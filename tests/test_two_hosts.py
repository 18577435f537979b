"""Two ranks on two hosts: network namespaces joined by a veth pair, MASTER_ADDR in the other one.

    pytest tests/test_two_hosts.py      # needs root and iproute2 (CI runs as root)

Each rank runs in its own namespace with its own address, so rank 1 reaches rank 0 only over the
veth link, as a second node would over the cluster network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ENTRY, PROMPTS, ROOT, base_config, prompt_records, reference_outputs, require

PROBLEM = (None if os.geteuid() == 0 and shutil.which("ip") is not None
           else "network namespaces need root and iproute2 (apt-get install iproute2)")

NET = "10.231.7"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


@pytest.fixture
def hosts():
    require(PROBLEM)  # skips here without root or ip; fails in CI
    tag = str(os.getpid() % 100000)
    ns, dev = [f"pi{tag}a", f"pi{tag}b"], [f"pi{tag}a0", f"pi{tag}b0"]
    try:
        for name in ns:
            sh("ip", "netns", "add", name)
            sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", dev[0], "netns", ns[0], "type", "veth", "peer", "name", dev[1], "netns", ns[1])
        for i, (name, d) in enumerate(zip(ns, dev)):
            sh("ip", "netns", "exec", name, "ip", "addr", "add", f"{NET}.{i + 1}/24", "dev", d)
            sh("ip", "netns", "exec", name, "ip", "link", "set", d, "up")
        yield ns, dev
    finally:
        for name in ns:
            sh("ip", "netns", "del", name, check=False)


def start_ranks(cfg: dict, tmp_path, ns, dev) -> list[subprocess.Popen]:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR=f"{NET}.1",
                   MASTER_PORT="29611", GLOO_SOCKET_IFNAME=dev[rank], OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        procs.append(subprocess.Popen(["ip", "netns", "exec", ns[rank], sys.executable, ENTRY, "--config", str(path)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def slow_link(ns: str, dev: str) -> str:
    """netem delay where the kernel has it; else a tbf rate limit, a stand-in that slows every
    message (this sandbox's kernel has no netem)."""
    if sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", "20ms",
          check=False).returncode == 0:
        return "netem delay 20ms"
    sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "2mbit", "burst", "8kb",
       "latency", "200ms")
    return "tbf 2mbit (stand-in for netem)"


def test_slow_link_leaves_outputs_unchanged(tiny_llama, tmp_path, hosts):
    ns, dev = hosts
    shaping = [slow_link(n, d) for n, d in zip(ns, dev)]
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, max_new_tokens=8, timeout_s=120)
    procs = start_ranks(cfg, tmp_path, ns, dev)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], (shaping, [e[-1500:] for _, e in outs])
    with open(cfg["output_path"]) as f:
        got = [p["output_ids"] for p in prompt_records([json.loads(line) for line in f])]
    assert got == reference_outputs(tiny_llama, PROMPTS, 8)


def test_cut_link_ends_both_ranks_with_timeout(tiny_llama, tmp_path, hosts):
    ns, dev = hosts
    timeout_s = 10
    prompts = [f"prompt {i}" for i in range(40)]
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, prompts=prompts, max_new_tokens=200, ignore_eos=True,
                      batch_size=1, timeout_s=timeout_s)
    procs = start_ranks(cfg, tmp_path, ns, dev)
    try:
        deadline = time.monotonic() + 120
        while not (os.path.exists(cfg["output_path"]) and '"prompt"' in open(cfg["output_path"]).read()):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                [p.communicate()[1][-1500:] for p in procs if p.poll() is not None]
            time.sleep(0.05)
        sh("ip", "netns", "exec", ns[0], "ip", "link", "set", dev[0], "down")
        t0 = time.monotonic()
        outs = [p.communicate(timeout=timeout_s + 60) for p in procs]
        waited = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [1, 1], [e[-1500:] for _, e in outs]
    assert waited < timeout_s + 45
    for rank, (_, err) in enumerate(outs):
        line = next(line for line in err.splitlines() if line.startswith("error:"))
        assert f"rank {1 - rank}" in line and f"timeout_s={timeout_s}" in line, line


@pytest.fixture
def name_on_loopback(hosts):
    """Both hosts' /etc/hosts map this machine's name to 127.0.1.1, as Debian writes it: `ip netns
    exec` mounts /etc/netns/<ns>/hosts over /etc/hosts inside that namespace."""
    ns, dev = hosts
    made = []
    try:
        for name in ns:
            folder = f"/etc/netns/{name}"
            os.makedirs(folder, exist_ok=True)
            made.append(folder)
            with open(f"{folder}/hosts", "w") as f:
                f.write(f"127.0.0.1 localhost\n127.0.1.1 {os.uname().nodename}\n")
        yield ns, dev
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)


def test_hostname_on_loopback_needs_socket_ifname(tiny_llama, tmp_path, name_on_loopback):
    """Without GLOO_SOCKET_IFNAME gloo listens on 127.0.1.1, which the other host cannot reach:
    both ranks end with one line that names the cause and the fix; with it the run is generate()'s."""
    ns, dev = name_on_loopback
    resolved = sh("ip", "netns", "exec", ns[0], sys.executable, "-c",
                  "import socket; print(socket.gethostbyname(socket.gethostname()))").stdout.strip()
    assert resolved == "127.0.1.1"
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, max_new_tokens=6, timeout_s=10)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))

    def start(rank: int, ifname: bool) -> subprocess.Popen:
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR=f"{NET}.1",
                   MASTER_PORT="29612", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
        env.pop("GLOO_SOCKET_IFNAME", None)
        if ifname:
            env["GLOO_SOCKET_IFNAME"] = dev[rank]
        return subprocess.Popen(["ip", "netns", "exec", ns[rank], sys.executable, ENTRY, "--config", str(path)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    procs = [start(r, ifname=False) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], [e[-1500:] for _, e in outs]
    for _, err in outs:
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "resolves to 127.0.1.1" in lines[0] and "GLOO_SOCKET_IFNAME" in lines[0], err[-1500:]
        assert "Traceback" not in err

    procs = [start(r, ifname=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in outs]
    with open(cfg["output_path"]) as f:
        records = [json.loads(line) for line in f]
    assert [p["output_ids"] for p in prompt_records(records)] == reference_outputs(tiny_llama, PROMPTS, 6)
    network = {r["rank"]: r["network"] for r in records if r["type"] == "stage"}
    for rank in range(2):
        assert network[rank]["hostname_address"] == "127.0.1.1"
        assert network[rank]["gloo_socket_ifname"] == dev[rank]
        assert network[rank]["gloo_address"] == network[rank]["route_to_master"] == f"{NET}.{rank + 1}"
