"""submit.sbatch passes the socket interface settings on to the ranks (and into the container).

    pytest tests/test_submit_env.py

Runs the job script itself outside Slurm, with stand-ins for scontrol and srun on PATH (the real
two-node cluster test is tests/test_slurm.py): the srun stand-in prints the environment a rank
would start with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

STUBS = {
    "scontrol": '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && { echo node1; echo node2; }\nexit 0\n',
    "srun": "#!/bin/sh\n# stand-in for srun: print what a rank would see, start nothing\n"
            "for v in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME APPTAINERENV_GLOO_SOCKET_IFNAME "
            "APPTAINERENV_NCCL_SOCKET_IFNAME; do eval echo \"rank-env $v=\\${$v:-}\"; done\nexit 0\n",
    "sacct": "#!/bin/sh\nexit 1\n",
}


def run_job(tmp_path, **env_extra) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in STUBS.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_path=str(model), pipeline_size=2, prompts=["a"],
                                      output_path=str(tmp_path / "out" / "run.jsonl"))))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "APPTAINER", "GLOO_", "NCCL_", "SOCKET_IFNAME"))}
    env.update(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin", SLURM_JOB_ID="4242",
               SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[1-2]", CONTAINER_IMAGE="none", MODULES="",
               EXP_CONFIG=str(config), PYTHON=sys.executable)
    env.update(env_extra)
    return subprocess.run(["bash", os.path.join(ROOT, "submit.sbatch")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def rank_env(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout + done.stderr
    return dict(line.removeprefix("rank-env ").split("=", 1) for line in done.stdout.splitlines()
                if line.startswith("rank-env "))


@pytest.mark.parametrize("given, gloo, nccl", [
    ({}, "", ""),
    ({"SOCKET_IFNAME": "ib0"}, "ib0", "ib0"),
    ({"GLOO_SOCKET_IFNAME": "eth1"}, "eth1", ""),
    ({"SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "ib1"}, "ib0", "ib1"),
])
def test_socket_interfaces_reach_the_ranks(tmp_path, given, gloo, nccl):
    done = run_job(tmp_path, **given)
    env = rank_env(done)
    assert env["GLOO_SOCKET_IFNAME"] == env["APPTAINERENV_GLOO_SOCKET_IFNAME"] == gloo
    assert env["NCCL_SOCKET_IFNAME"] == env["APPTAINERENV_NCCL_SOCKET_IFNAME"] == nccl
    if gloo:
        assert f"GLOO_SOCKET_IFNAME={gloo}" in done.stdout  # the job log says which interface
