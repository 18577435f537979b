"""submit.sbatch end to end on a real two-node Slurm cluster (tests/slurm/cluster.sh), all on CPU.

    bash .ci/install_slurm.sh && bash tests/slurm/cluster.sh start
    pytest tests/test_slurm.py

The tests talk only to the project's own cluster: every Slurm command they run gets the SLURM_CONF
that tests/slurm/cluster.sh writes (`bash tests/slurm/cluster.sh env` prints it), whatever the
environment's SLURM_CONF or /etc/slurm say, so a site's cluster or another one on this machine never
sees a test job. Another cluster is used only when asked by name:

    PIPEINFER_SLURM_CONF=/etc/slurm/slurm.conf pytest tests/test_slurm.py

(its nodes must run on this machine, like the project's: the tests share tmp paths with the jobs and
find the ranks in /proc; two nodes with one `gpu` gres each, as submit.sbatch asks for).

Skipped, with the reason, where sbatch is missing or the cluster is not up. Jobs run one at a time:
each node has one CPU, and submit.sbatch takes both nodes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import reference_outputs

REPO = Path(__file__).resolve().parents[1]
FAKE_APPTAINER = REPO / "tests" / "slurm" / "fake-apptainer"
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
JOB_TIMEOUT_S = 240
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
# Variables that would send a Slurm command elsewhere (SLURM_CONF, SLURM_CLUSTERS) or change what it
# submits (SBATCH_PARTITION, ...): the tests set SLURM_CONF themselves and pass none of the others on.
SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SACCT_", "SQUEUE_", "SINFO_", "SCANCEL_", "SCONTROL_")


def project_slurm_conf():
    """The slurm.conf that tests/slurm/cluster.sh writes (its `env` command prints it)."""
    out = subprocess.run(["bash", str(CLUSTER_SH), "env"], capture_output=True, text=True, check=True).stdout
    return out.strip().removeprefix("export SLURM_CONF=")


OWN_CLUSTER = not os.environ.get("PIPEINFER_SLURM_CONF")
SLURM_CONF = project_slurm_conf() if OWN_CLUSTER else os.environ["PIPEINFER_SLURM_CONF"]


def slurm_env(**extra):
    """This process's environment with SLURM_CONF set to the tests' cluster and nothing else of Slurm's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SLURM_ENV_PREFIXES)}
    env.update(SLURM_CONF=SLURM_CONF, **extra)
    return env


def slurm(*command, **kwargs):
    """Run a Slurm command (sinfo, sacct, scontrol, scancel, squeue) against the tests' cluster."""
    return subprocess.run(command, env=slurm_env(), capture_output=True, text=True, **kwargs)


def cluster_problem():
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH: run bash .ci/install_slurm.sh && bash tests/slurm/cluster.sh start"
    if not Path(SLURM_CONF).is_file():
        if OWN_CLUSTER:
            return f"no {SLURM_CONF}: start the project's cluster with bash tests/slurm/cluster.sh start"
        return f"PIPEINFER_SLURM_CONF={SLURM_CONF} is not a file: point it at the other cluster's slurm.conf"
    try:
        out = slurm("sinfo", "-h", "-N", "-o", "%N %t", timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed ({err}) with SLURM_CONF={SLURM_CONF}: start the cluster with bash tests/slurm/cluster.sh start"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    up = [node for node, state in states.items() if state.rstrip("*") in ("idle", "mix", "alloc")]
    if out.returncode != 0 or len(up) < 2:
        return (f"fewer than 2 nodes up with SLURM_CONF={SLURM_CONF} (sinfo: {states or out.stderr.strip()}): "
                "bash tests/slurm/cluster.sh start")
    return None


def config_value(key):
    """A value of `scontrol show config`: what the controller the tests reach actually runs with."""
    for line in slurm("scontrol", "show", "config", check=True, timeout=10).stdout.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == key:
            return value.strip()
    raise AssertionError(f"scontrol show config has no {key}")


PROBLEM = cluster_problem()
CLUSTER_NAME = None
if PROBLEM is None:
    try:
        CLUSTER_NAME = config_value("ClusterName")
    except (OSError, subprocess.SubprocessError, AssertionError) as err:
        PROBLEM = f"scontrol show config failed with SLURM_CONF={SLURM_CONF}: {err}"
# CI starts the cluster and sets PIPEINFER_REQUIRE_SLURM=1: there a missing cluster fails, never skips.
REQUIRED = os.environ.get("PIPEINFER_REQUIRE_SLURM") == "1"
pytestmark = pytest.mark.skipif(PROBLEM is not None and not REQUIRED, reason=str(PROBLEM))


def test_cluster_is_up():
    assert PROBLEM is None, PROBLEM


def test_slurm_commands_ignore_the_environments_cluster(monkeypatch):
    """A SLURM_CONF or SLURM_CLUSTERS in the environment (a login node's, another cluster's) does not
    redirect the tests: they reach the project's cluster, at the config tests/slurm/cluster.sh writes."""
    assert PROBLEM is None, PROBLEM
    if OWN_CLUSTER:
        assert SLURM_CONF == project_slurm_conf() and not SLURM_CONF.startswith("/etc/"), SLURM_CONF
        conf = dict(line.split("=", 1) for line in Path(SLURM_CONF).read_text().splitlines()
                    if "=" in line and not line.startswith(("#", "NodeName", "PartitionName")))
        assert CLUSTER_NAME == conf["ClusterName"] == "pipeinfer"
        assert config_value("SlurmctldPort") == conf["SlurmctldPort"] != "6817"   # not Slurm's default port
    monkeypatch.setenv("SLURM_CONF", "/nonexistent/slurm.conf")
    monkeypatch.setenv("SLURM_CLUSTERS", "some-other-cluster")
    assert config_value("ClusterName") == CLUSTER_NAME
    assert slurm("sinfo", "-h", "-N").returncode == 0
    assert slurm_env()["SLURM_CONF"] == SLURM_CONF and "SLURM_CLUSTERS" not in slurm_env()

PROMPTS = ["The quick brown fox", "Hello", "Pipeline parallelism splits a model"]
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny-llama"
    subprocess.run([sys.executable, "-m", "pipeinfer.models.tiny", "--out", str(out)], cwd=REPO, check=True, timeout=300)
    return out


def write_config(path, model_dir, output_path, **overrides):
    config = {"model_path": str(model_dir), "pipeline_size": 2, "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS,
              "batch_size": 2, "seed": 0, "output_path": str(output_path), "timeout_s": 60}
    config.update(overrides)
    path.write_text(json.dumps(config))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reference(model_dir):
    """Whole-model transformers generate() on the same prompts: every Slurm run must reproduce it."""
    return dict(enumerate(reference_outputs(str(model_dir), PROMPTS, MAX_NEW_TOKENS)))


def job_env(**extra):
    """The environment sbatch passes on to the job: the tests' SLURM_CONF (sbatch, and Slurm commands in
    the job, talk to the tests' cluster) and this interpreter."""
    env = slurm_env()
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", PYTHON=sys.executable, MODULES="")
    env.update(extra)
    return env


def job_state(job_id, timeout_s=30):
    """The job's final State (first word) from sacct, waiting for accounting to show it ended."""
    deadline = time.monotonic() + timeout_s
    state = ""
    while time.monotonic() < deadline:
        out = slurm("sacct", "-j", str(job_id), "-X", "-P", "--noheader", "--format=State").stdout.split()
        state = out[0] if out else ""
        if state in FINISHED:
            return state
        time.sleep(1)
    return state


def sbatch(tmp_path, env, *args, wait=True):
    """Submit submit.sbatch from the repo root; returns (job id, sbatch status or None, log path)."""
    log = tmp_path / "slurm-%j.out"
    command = ["sbatch", "--parsable", f"--output={log}"] + (["--wait"] if wait else []) + ["submit.sbatch", *args]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch said {job_id!r}: {proc.stderr.read()}"
    status = None
    if wait:
        try:
            status = proc.wait(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            slurm("scancel", job_id)
            proc.kill()
            pytest.fail(f"job {job_id} still running after {JOB_TIMEOUT_S} s: {Path(str(log).replace('%j', job_id)).read_text()}")
    return job_id, status, Path(str(log).replace("%j", job_id))


def assert_completed_run(job_id, status, log, output, reference):
    assert status == 0, log.read_text()
    assert job_state(job_id) == "COMPLETED"
    records = read_jsonl(output)
    prompts = [r for r in records if r["type"] == "prompt"]
    assert len(prompts) == len(PROMPTS)
    assert {r["prompt_index"]: r["output_ids"] for r in prompts} == reference
    # The ranks ran on the tests' cluster, and the job's own Slurm commands (scontrol in submit.sbatch,
    # sacct in pipeinfer.slurm) had its SLURM_CONF.
    run_env = next(r for r in records if r["type"] == "run")["env"]
    assert run_env["SLURM_CLUSTER_NAME"] == CLUSTER_NAME, run_env
    if OWN_CLUSTER:
        assert run_env["SLURM_CONF"] == SLURM_CONF, run_env
    sacct = records[-1]
    assert sacct["type"] == "sacct" and sacct["job_id"] == job_id
    rows = {r["step"] or "job": r for r in sacct["rows"]}
    # the steps every configuration has ("extern" exists only with PrologFlags=Contain)
    assert {"job", "batch", "0"} <= set(rows), sacct
    assert rows["0"]["state"] == "COMPLETED" and rows["0"]["node_list"] == rows["job"]["node_list"]
    assert len(hostnames(rows["0"]["node_list"])) == 2, rows["0"]
    assert all(r["elapsed_s"] is not None for r in rows.values())
    assert rows["0"]["max_rss_bytes"] > 0
    return records


def hostnames(node_list):
    """'node[1-2]' -> ['node1', 'node2'], as submit.sbatch expands it for MASTER_ADDR."""
    return slurm("scontrol", "show", "hostnames", node_list, check=True).stdout.split()


def test_two_nodes_without_container(tmp_path, model_dir, reference):
    output = tmp_path / "out" / "run.jsonl"
    config = write_config(tmp_path / "config.json", model_dir, output)
    job_id, status, log = sbatch(tmp_path, job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config)))
    records = assert_completed_run(job_id, status, log, output, reference)
    job_row = next(r for r in records[-1]["rows"] if r["step"] is None)
    first_node = hostnames(job_row["node_list"])[0]
    text = log.read_text()
    assert f"rendezvous {first_node}:{20000 + int(job_id) % 20000}" in text, text


def test_two_nodes_with_fake_apptainer(tmp_path, model_dir, reference):
    output = tmp_path / "out" / "run.jsonl"
    prompts_file = tmp_path / "in" / "prompts.txt"  # outside the repo, like the output and the offload folder
    prompts_file.parent.mkdir()
    prompts_file.write_text("\n".join(PROMPTS) + "\n")
    config = write_config(tmp_path / "config.json", model_dir, output, prompts=None, prompts_file=str(prompts_file),
                          offload_folder=str(tmp_path / "scratch" / "offload"))
    image = tmp_path / "pytorch.sif"
    image.write_text("stand-in image for tests/slurm/fake-apptainer\n")
    env = job_env(CONTAINER_IMAGE=str(image), EXP_CONFIG=str(config))
    env["PATH"] = f"{FAKE_APPTAINER}:{env['PATH']}"
    job_id, status, log = sbatch(tmp_path, env)
    assert_completed_run(job_id, status, log, output, reference)
    text = log.read_text()
    assert text.count("fake-apptainer: running") == 2       # one container per rank
    for path in (tmp_path / "out", tmp_path / "in", tmp_path / "scratch" / "offload"):
        assert f"--bind {path} " in text, text               # every path the ranks use is bound


def rank_pid(job_id, rank, timeout_s):
    """The pid of the runner process of `rank` in the job's srun step, found through /proc."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes()
                environ = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if (b"run_distributed_inference.py" in cmdline and f"SLURM_JOB_ID={job_id}".encode() in environ
                    and f"SLURM_CLUSTER_NAME={CLUSTER_NAME}".encode() in environ  # job ids repeat across clusters
                    and f"SLURM_PROCID={rank}".encode() in environ and b"SLURM_STEP_ID=0" in environ):
                return int(proc.name)
        time.sleep(0.2)
    return None


def test_killed_rank_fails_the_job_without_hanging(tmp_path, model_dir):
    output = tmp_path / "out" / "run.jsonl"
    timeout_s = 30
    config = write_config(tmp_path / "config.json", model_dir, output, prompts=PROMPTS * 40, batch_size=1,
                          max_new_tokens=200, ignore_eos=True, timeout_s=timeout_s)
    job_id, _, log = sbatch(tmp_path, job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config)), wait=False)
    try:
        deadline = time.monotonic() + 120       # both stages loaded: rank 1 is in the pipeline
        while time.monotonic() < deadline and (not log.exists() or log.read_text().count(" owns layers ") < 2):
            time.sleep(0.5)
        time.sleep(2)
        pid = rank_pid(job_id, rank=1, timeout_s=10)
        assert pid, f"rank 1 of job {job_id} not found: {log.read_text() if log.exists() else 'no log'}"
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        state = job_state(job_id, timeout_s=timeout_s + 60)
        assert state in ("FAILED", "NODE_FAIL", "CANCELLED"), f"job {job_id} state {state!r}: {log.read_text()}"
        assert time.monotonic() - killed_at < timeout_s + 60
        text = log.read_text()
        assert "srun exited with status 0" not in text and "scontrol requeue" not in text, text
    finally:
        slurm("scancel", job_id)


def test_pipeline_size_not_matching_the_allocation_is_one_line_error(tmp_path, model_dir):
    config = write_config(tmp_path / "config.json", model_dir, tmp_path / "run.jsonl", pipeline_size=3)
    job_id, status, log = sbatch(tmp_path, job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config)))
    assert status == 2
    errors = [line for line in log.read_text().splitlines() if "error" in line]
    assert errors == [f"submit.sbatch: error: pipeline_size=3 in {config} but the allocation has 2 tasks: "
                      "submit with sbatch --nodes=3, or set pipeline_size to 2"]
    assert not (tmp_path / "run.jsonl").exists()
    assert job_state(job_id) == "FAILED"


def test_usr1_before_time_limit_stops_requeues_and_resumes(tmp_path, model_dir):
    """The time-limit warning path with the real runner: USR1 to the batch shell -> forwarded to the
    ranks -> they save finished prompts and exit 75 -> the job is requeued -> the rerun resumes."""
    prompts = [f"prompt {i}: " + "x" * i for i in range(12)]
    output = tmp_path / "run.jsonl"
    config = write_config(tmp_path / "config.json", model_dir, output, prompts=prompts, max_new_tokens=200,
                          ignore_eos=True, batch_size=1)
    env = job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config))
    job, _, log = sbatch(tmp_path, env, wait=False)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (output.exists() and '"type": "prompt"' in output.read_text()):
            time.sleep(0.2)
        slurm("scancel", "--batch", "--signal=USR1", job, check=True)
        # Whole-model generate() on every prompt (about 20-40 s here), computed while Slurm holds the
        # requeued job back (about 2 minutes) rather than after it. The config decodes past EOS.
        reference = pool.submit(reference_outputs, str(model_dir), prompts, 200, ignore_eos=True)
        deadline = time.monotonic() + 300  # Slurm holds a requeued job back for a while before it restarts
        while time.monotonic() < deadline and "resuming:" not in log.read_text():
            time.sleep(1)
        assert job_state(job, timeout_s=120) == "COMPLETED", log.read_text()[-3000:]
        text = log.read_text()
        assert "got SIGUSR1, forwarding" in text and f"scontrol requeue {job}" in text, text[-3000:]
        assert "rerun the same config to resume" in text and "resuming:" in text, text[-3000:]
    finally:
        slurm("scancel", job)
        pool.shutdown(wait=True)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    indices = sorted(r["prompt_index"] for r in records if r["type"] == "prompt")
    assert indices == list(range(len(prompts))), "exactly one record per prompt across the two attempts"
    assert [r["type"] for r in records].count("run") == 2
    assert records[-1]["type"] == "sacct"
    # Both attempts' outputs, the ones saved before the stop and the ones after the resume, are generate()'s.
    outputs = {r["prompt_index"]: r["output_ids"] for r in records if r["type"] == "prompt"}
    assert outputs == dict(enumerate(reference.result()))


def test_scancel_stops_the_job_without_requeueing_it(tmp_path, model_dir):
    """scancel sends TERM: the ranks save what is finished and exit 75, but a cancelled job must
    stay cancelled (requeueing it would undo the user's scancel)."""
    output = tmp_path / "run.jsonl"
    config = write_config(tmp_path / "config.json", model_dir, output, prompts=PROMPTS * 8, max_new_tokens=200,
                          ignore_eos=True, batch_size=1)
    job, _, log = sbatch(tmp_path, job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config)), wait=False)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (output.exists() and '"type": "prompt"' in output.read_text()):
            time.sleep(0.2)
        slurm("scancel", job, check=True)
        assert job_state(job, timeout_s=90) == "CANCELLED", log.read_text()[-3000:]
        time.sleep(5)  # a requeue would show the job pending again by now
        queued = slurm("squeue", "-h", "-j", job).stdout.strip()
        assert not queued, f"job {job} is queued again: {queued}\n{log.read_text()[-3000:]}"
        text = log.read_text()
        assert "scontrol requeue" not in text and "not requeued" in text, text[-3000:]
    finally:
        slurm("scancel", job)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert records[-1]["type"] == "summary" and records[-1]["interrupted"] is True


def submit_replicas(env, *args):
    """Run submit_replicas.sh; returns (array job id, merge job id)."""
    out = subprocess.run(["bash", "submit_replicas.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    last = out.stdout.strip().splitlines()[-1]  # replicas: array job A (tasks ...), merge job M
    return last.split("array job ")[1].split()[0], last.split("merge job ")[1].split()[0]


def test_replicas_job_array_kill_one_task_resubmit_and_merge(tmp_path, model_dir):
    """Two replicas at pipeline_size 1 as a job array, the merge after it. One task is cancelled
    mid-run: the merge names its share and prints the command that reruns only that task, which
    (with resume) completes the set: every prompt once, in order, equal to generate()."""
    prompts = [f"replica prompt {i}: " + "y" * i for i in range(6)]
    output = tmp_path / "out" / "run.jsonl"
    config = write_config(tmp_path / "config.json", model_dir, output, prompts=prompts, pipeline_size=1, replicas=2,
                          batch_size=1, max_new_tokens=150, ignore_eos=True)
    env = job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config), LOG_DIR=str(tmp_path / "logs"))
    array, merge = submit_replicas(env)
    share1 = tmp_path / "out" / "run.replica1.jsonl"
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (share1.exists() and '"type": "prompt"' in share1.read_text()):
            time.sleep(0.2)
        slurm("scancel", f"{array}_1", check=True)
        reference = pool.submit(reference_outputs, str(model_dir), prompts, 150, ignore_eos=True)
        assert job_state(merge, timeout_s=180) == "FAILED"  # exit 75: a share is incomplete
        text = (tmp_path / "logs" / f"pipeinfer-merge-{merge}.out").read_text()
        assert "shares of replicas 1 are incomplete" in text and not output.exists(), text
        command = text.strip().splitlines()[-1]
        assert command.startswith("ARRAY=1 "), text
        rerun = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        merge2 = rerun.stdout.strip().splitlines()[-1].split("merge job ")[1].split()[0]
        assert job_state(merge2, timeout_s=JOB_TIMEOUT_S) == "COMPLETED", \
            (tmp_path / "logs" / f"pipeinfer-merge-{merge2}.out").read_text()
    finally:
        slurm("scancel", array, merge)
        pool.shutdown(wait=True)
    records = read_jsonl(output)
    merged = [r for r in records if r["type"] == "prompt"]
    assert [r["prompt_index"] for r in merged] == list(range(len(prompts)))  # each once, in order
    assert [r["replica"] for r in merged] == [0, 1] * 3
    assert [r["output_ids"] for r in merged] == reference.result()
    # replica 1 ran twice (cancelled, then resumed): two run records in its file, no prompt twice
    assert [r["replica"] for r in records if r["type"] == "run"].count(1) == 2


def test_sweep_submits_one_array_per_node_count_and_resubmits_nothing(tmp_path, model_dir, reference):
    """A 2 x 2 x 2 sweep through Slurm: the cell that cannot fit is listed and not submitted, the
    others run as one job array per node count, and a rerun of the sweep submits nothing new."""
    base = {"model_path": str(model_dir), "prompts": PROMPTS, "max_new_tokens": MAX_NEW_TOKENS, "device": "cpu",
            "dtype": "float32", "timeout_s": 60}
    (tmp_path / "base.json").write_text(json.dumps(base))
    spec = {"base": str(tmp_path / "base.json"), "out": str(tmp_path / "sweep"), "device_memory": "2.5MiB",
            "axes": {"pipeline_size": [1, 2], "batch_size": [1, 4], "quantization": ["none", "int8"]}}
    (tmp_path / "sweep.json").write_text(json.dumps(spec))
    env = job_env(CONTAINER_IMAGE="none")

    def run_sweep():
        res = subprocess.run([sys.executable, "-m", "pipeinfer.sweep", str(tmp_path / "sweep.json"), "--submit"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res.stdout

    out = run_sweep()
    jobs = json.loads((tmp_path / "sweep" / "jobs.json").read_text())
    meta = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    dropped = [c["name"] for c in meta["cells"] if not c["fits"]]
    assert dropped and set(jobs) == {c["name"] for c in meta["cells"] if c["fits"]}, out
    assert all(f"dropped {name}: " in out for name in dropped)
    assert len({job.split("_")[0] for job in jobs.values()}) == len({c["nodes"] for c in meta["cells"] if c["fits"]})
    try:
        for name, job in jobs.items():
            assert job_state(job, timeout_s=JOB_TIMEOUT_S) == "COMPLETED", \
                [p.read_text()[-2000:] for p in (tmp_path / "sweep" / "logs").iterdir()]
    finally:
        slurm("scancel", *{job.split("_")[0] for job in jobs.values()})
    for cell in meta["cells"]:
        if cell["fits"] and cell["values"]["quantization"] == "none":
            prompts = [r for r in read_jsonl(cell["results"]) if r["type"] == "prompt"]
            assert {r["prompt_index"]: r["output_ids"] for r in prompts} == reference, cell["name"]
    again = run_sweep()
    assert "nothing to submit" in again and json.loads((tmp_path / "sweep" / "jobs.json").read_text()) == jobs, again


def test_replicas_of_two_nodes_each_merge_equal_to_generate(tmp_path, model_dir, reference):
    """Replicas of pipeline_size 2: each array task takes both nodes, one after the other."""
    output = tmp_path / "out" / "run.jsonl"
    config = write_config(tmp_path / "config.json", model_dir, output, pipeline_size=2, replicas=2)
    env = job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config), LOG_DIR=str(tmp_path / "logs"))
    array, merge = submit_replicas(env)
    try:
        assert job_state(merge, timeout_s=JOB_TIMEOUT_S) == "COMPLETED", \
            [p.read_text()[-2000:] for p in (tmp_path / "logs").iterdir()]
    finally:
        slurm("scancel", array, merge)
    records = read_jsonl(output)
    merged = [r for r in records if r["type"] == "prompt"]
    assert [r["prompt_index"] for r in merged] == list(range(len(PROMPTS))) and [r["replica"] for r in merged] == [0, 1, 0]
    assert {r["prompt_index"]: r["output_ids"] for r in merged} == reference
    assert [len(r["layers_per_rank"]) for r in records if r["type"] == "run"] == [2, 2]


def test_serve_mode_prints_the_tunnel_and_drains_on_scancel(tmp_path, model_dir, reference):
    """MODE=serve: once every rank loaded, the log names the node and port and the ssh -L command;
    a completion over that port is generate()'s; scancel drains and both ranks exit 0."""
    import urllib.request

    from conftest import free_port
    from transformers import AutoTokenizer

    config = write_config(tmp_path / "config.json", model_dir, tmp_path / "unused.jsonl", prompts=None,
                          max_prompt_tokens=64)
    port = free_port()
    env = job_env(CONTAINER_IMAGE="none", EXP_CONFIG=str(config), MODE="serve", SERVE_PORT=str(port))
    job, _, log = sbatch(tmp_path, env, wait=False)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and "ssh -N -L" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.5)
        tunnel = [line for line in log.read_text().splitlines() if "ssh -N -L" in line]
        assert tunnel, log.read_text()[-3000:]
        node = tunnel[0].split(" node ")[1].split()[0]
        assert node in ("node1", "node2") and f"port {port};" in tunnel[0]
        assert f"ssh -N -L {port}:127.0.0.1:{port} -J " in tunnel[0] and tunnel[0].rstrip().endswith("/v1")
        body = json.dumps({"model": model_dir.name, "prompt": PROMPTS[0], "max_tokens": MAX_NEW_TOKENS}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        ids = reference[0][:-1] if reference[0][-1:] == [tok.eos_token_id] else reference[0]
        assert text == tok.decode(ids, skip_special_tokens=True)
        slurm("scancel", job, check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "srun exited with status" not in log.read_text():
            time.sleep(0.5)
        assert "srun exited with status 0" in log.read_text(), log.read_text()[-3000:]
    finally:
        slurm("scancel", job)
