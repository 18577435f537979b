"""lm-evaluation-harness through the pipeline (`--model pipeinfer`, pipeinfer/evaluate/) against
lm-eval's own `--model hf` on the whole model in float32: three local tasks (multiple choice: acc
and acc_norm; perplexity over rolling windows: word/byte perplexity and bits per byte; generation
with stop strings: exact_match), the same metrics, the same per-sample log-likelihoods and
is_greedy flags (--log_samples) and the same generated text. The tasks' data are JSONL files the
test writes; nothing is downloaded (HF_DATASETS_OFFLINE=1).

    pytest tests/test_lmeval.py
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, base_config, free_port, rank_env, require, start_rank
from test_pretrained import smollm2  # noqa: F401  (the real demo checkpoint, built once into models/)

try:
    import lm_eval  # noqa: F401
    MISSING = None
except ImportError:
    MISSING = "lm-eval is a test dependency: pip install -r requirements-dev.txt"

EVAL_MAIN = os.path.join(ROOT, "pipeinfer", "evaluate", "__main__.py")
OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
TASKS = ["pi_mc", "pi_ppl", "pi_gen"]
SYSTEM = "Answer in one word."
LONG = " ".join(f"word{i}" for i in range(90))  # ~530 bytes: past a tiny model's 256 positions (byte tokens)

MC = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
    {"question": "Two plus two equals ", "choices": ["four", "five", "twenty two"], "answer": 0},
    {"question": "Pipeline parallel inference splits", "choices": [" layers", " tokens"], "answer": 0},
    {"question": "A" * 3, "choices": [" a", " a b", " a b c"], "answer": 2},  # continuations sharing a prefix
    {"question": "Long context: " + LONG + " so the answer is", "choices": [" yes", " no"], "answer": 1},
]
PPL = [{"text": "The quick brown fox jumps over the lazy dog."},
       {"text": "Perplexity is computed over rolling windows. " + LONG + " " + LONG}]  # several windows
GEN = [{"question": "Q: What is one plus one?\nA:", "answer": " two"},
       {"question": "Once upon a time", "answer": " there"},
       {"question": "List: a, b, c,", "answer": " d"}]

def mc_task(name: str, doc_to_text: str = '"{{{{question}}}}"') -> str:
    """A multiple-choice task over {data}/mc.jsonl (a format string: .format(data=DIR))."""
    return f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {{data}}/mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: {doc_to_text}
doc_to_choice: "{{{{{{{{choices}}}}}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


YAML = {
    "pi_mc": mc_task("pi_mc"),
    "pi_ppl": """task: pi_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
    "pi_gen": """task: pi_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for name, rows in (("mc", MC), ("ppl", PPL), ("gen", GEN)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, text in YAML.items():
        (d / f"{task}.yaml").write_text(text.format(data=d))
    return str(d)


@pytest.fixture(autouse=True, scope="module")
def offline(tmp_path_factory):
    require(MISSING)
    saved = {k: os.environ.get(k) for k in [*OFFLINE, "HF_DATASETS_CACHE"]}
    os.environ.update(OFFLINE, HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("hf-datasets")))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def hf_reference(model: str, task_dir: str, tasks=TASKS, chat: bool = False) -> tuple[dict, dict]:
    """lm-eval's own hf backend on the whole model, float32, in this process: (metrics, samples) per task."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=list(tasks),
                                  device="cpu", batch_size=1, log_samples=True,
                                  task_manager=TaskManager(include_path=task_dir), apply_chat_template=chat,
                                  system_instruction=SYSTEM if chat else None)
    return out["results"], {t: _by_doc(s) for t, s in out["samples"].items()}


def _by_doc(samples: list[dict]) -> list[dict]:
    return sorted(samples, key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def tiny_neox(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "neox"), seed=4, model_type="gpt_neox",
                      hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                      max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "qwen2"), seed=5, model_type="qwen2",
                      hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)


_references: dict = {}


def reference(model: str, task_dir: str, tasks=TASKS, chat: bool = False):
    key = (model, tuple(tasks), chat)
    if key not in _references:
        _references[key] = hf_reference(model, task_dir, tasks, chat)
    return _references[key]


def start_eval(cfg: dict, tmp_path, world: int, args=(), tasks=TASKS, task_dir=None, model_args=""):
    """Every rank of `python -m pipeinfer.evaluate` (as plain processes, as srun starts them)."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    argv = [EVAL_MAIN, "--model_args", f"config={path}{model_args}", "--tasks", ",".join(tasks),
            "--output_path", str(tmp_path / "eval"), "--log_samples", *args]
    if task_dir:
        argv += ["--include_path", task_dir]
    port = free_port()
    return [start_rank(argv, dict(rank_env(r, world, port), **OFFLINE,
                                  HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"))) for r in range(world)]


def finish(procs, timeout: float = 300) -> list[tuple[int, str]]:
    out = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            out.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return out


def read_eval(out_dir, tasks=TASKS) -> tuple[dict, dict]:
    """The harness's results file and its samples files, as it wrote them."""
    (results,) = glob.glob(os.path.join(out_dir, "**", "results_*.json"), recursive=True)
    with open(results) as f:
        metrics = json.load(f)["results"]
    samples = {}
    for task in tasks:
        (path,) = glob.glob(os.path.join(out_dir, "**", f"samples_{task}_*.jsonl"), recursive=True)
        with open(path) as f:
            samples[task] = _by_doc([json.loads(line) for line in f])
    return metrics, samples


def assert_same(got: tuple[dict, dict], want: tuple[dict, dict], tasks=TASKS) -> None:
    (got_m, got_s), (want_m, want_s) = got, want
    for task in tasks:
        for key, value in want_m[task].items():
            if "stderr" in key:  # bootstrapped: "N/A" for few samples
                continue
            if isinstance(value, str) or key.startswith(("acc", "exact_match")):
                assert got_m[task][key] == value, (task, key)
            else:
                assert got_m[task][key] == pytest.approx(value, rel=1e-4), (task, key)
    for task in {"pi_mc", "pi_ppl"} & set(tasks):
        assert len(got_s[task]) == len(want_s[task])
        for g, w in zip(got_s[task], want_s[task]):
            assert len(_resps(g)) == len(_resps(w))
            for gr, wr in zip(_resps(g), _resps(w)):
                if task == "pi_mc":  # (log-likelihood, is_greedy) per choice
                    assert float(gr[0]) == pytest.approx(float(wr[0]), rel=1e-4, abs=1e-4), (task, g["doc_id"])
                    assert str(gr[1]) == str(wr[1]), (task, g["doc_id"])
                else:
                    assert float(gr) == pytest.approx(float(wr), rel=1e-4), (task, g["doc_id"])
    if "pi_gen" in tasks:  # the generated text, exactly
        assert [_resps(g) for g in got_s["pi_gen"]] == [_resps(w) for w in want_s["pi_gen"]]


def _resps(sample: dict) -> list:
    return [r[0] for r in sample["resps"]]


def run_eval(model: str, task_dir: str, tmp_path, world: int, tasks=TASKS, args=(), **over) -> tuple[dict, dict]:
    cfg = base_config(model, tmp_path, pipeline_size=world, dtype="float32", batch_size=4, **over)
    results = finish(start_eval(cfg, tmp_path, world, args, tasks, task_dir=task_dir))
    assert [code for code, _ in results] == [0] * world, "\n".join(err[-3000:] for _, err in results)
    return read_eval(tmp_path / "eval", tasks)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_tiny_llama_equals_hf_backend(tiny_llama, task_dir, tmp_path, world):
    """The rows schedule, at pipeline_size 1, 2 and 3; a long multiple-choice context is cut from
    the left as hf cuts it, and the long document spans several rolling windows."""
    assert_same(run_eval(tiny_llama, task_dir, tmp_path, world), reference(tiny_llama, task_dir))


@pytest.mark.parametrize("world,schedule", [(1, "rows"), (2, "micro_batches"), (3, "rows")])
def test_tiny_neox_equals_hf_backend(tiny_neox, task_dir, tmp_path, world, schedule):
    """Another family (GPT-NeoX), at pipeline_size 1, 2 and 3; at 2 on the micro_batches schedule
    (what sliding-window families use)."""
    assert_same(run_eval(tiny_neox, task_dir, tmp_path, world, schedule=schedule), reference(tiny_neox, task_dir))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_tiny_qwen2_equals_hf_backend(tiny_qwen2, task_dir, tmp_path, world):
    """A third family (Qwen2: biases on q, k, v), at pipeline_size 1, 2 and 3."""
    assert_same(run_eval(tiny_qwen2, task_dir, tmp_path, world), reference(tiny_qwen2, task_dir))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_demo_checkpoint_equals_hf_backend(smollm2, task_dir, tmp_path, world):  # noqa: F811
    """The real SmolLM2-135M-Instruct, its own BPE tokenizer, at pipeline_size 1, 2 and 3."""
    assert_same(run_eval(smollm2, task_dir, tmp_path, world), reference(smollm2, task_dir))


def test_demo_checkpoint_with_its_chat_template(smollm2, task_dir, tmp_path):  # noqa: F811
    """--apply_chat_template and --system_instruction: contexts rendered by the checkpoint's ChatML
    template, as the hf backend renders them."""
    tasks, args = ["pi_mc", "pi_gen"], ["--apply_chat_template", "--system_instruction", SYSTEM]
    assert_same(run_eval(smollm2, task_dir, tmp_path, 2, tasks, args),
                reference(smollm2, task_dir, tasks, chat=True), tasks)


BAD_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {kind}
doc_to_text: "{{{{question}}}}"
{rest}
"""


@pytest.mark.parametrize("name,kind,rest,needle", [
    ("pi_empty", "loglikelihood", 'doc_to_target: ""\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc',
     "the continuation tokenizes to nothing"),
    ("pi_nofit", "generate_until", 'doc_to_target: "x"\ngeneration_kwargs:\n  max_gen_toks: 300\n'
     "  do_sample: false\nmetric_list:\n  - metric: exact_match", "max_gen_toks=300"),
])
def test_a_request_that_cannot_run_is_one_line(tiny_llama, tmp_path, name, kind, rest, needle):
    """An empty continuation, or a generation that leaves no room for its context (lm-eval's hf
    backend fails an assertion on both; a multiple-choice task with an empty choice fails in the
    harness itself, before any request): one line on the first rank, exit 2, every rank ends, and
    no results file."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "Q"}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / f"{name}.yaml").write_text(BAD_TASK.format(name=name, data=data, kind=kind, rest=rest))
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2)
    got = finish(start_eval(cfg, tmp_path, 2, tasks=[name], task_dir=str(tmp_path / "tasks"),
                            model_args=",max_gen_toks=300,max_new_tokens=8"), timeout=180)
    assert got[0][0] == 2, got[0][1][-2000:]
    errors = [line for line in got[0][1].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], got[0][1][-2000:]
    assert "Traceback" not in got[0][1] and got[1][0] == 0, got
    assert not glob.glob(str(tmp_path / "eval" / "**" / "results_*.json"), recursive=True)


@pytest.mark.parametrize("model_args,needle", [(",no_such_key=1", "no_such_key"),
                                               (",max_length=many", "max_length='many'")])
def test_bad_model_args_are_one_line_on_every_rank(tiny_llama, task_dir, tmp_path, model_args, needle):
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2)
    got = finish(start_eval(cfg, tmp_path, 2, task_dir=task_dir, model_args=model_args), timeout=120)
    for code, err in got:
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and needle in errors[0] and "Traceback" not in err, err[-2000:]


def test_without_lm_eval_it_says_so(tmp_path):
    fake = tmp_path / "lm_eval"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('lm_eval is not installed here')\n")
    res = subprocess.run([sys.executable, "-m", "pipeinfer.evaluate", "--tasks", "x"], cwd=ROOT, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}"), timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: lm-eval is not installed: pip install 'lm_eval>=0.4,<0.5' (requirements-dev.txt)"], res.stderr


SLOW_GEN = """task: pi_slow
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "x"
generation_kwargs:
  until: ["@@@@"]
  max_gen_toks: 200
  do_sample: false
metric_list:
  - metric: exact_match
"""


def test_killed_stage_ends_every_rank_and_writes_no_results(tiny_llama, tmp_path):
    """A middle stage killed during generate_until: the first and last ranks each end within
    timeout_s with one line, and the harness writes no results file as if it had finished."""
    timeout_s = 10
    data = tmp_path / "slow.jsonl"
    data.write_text("".join(json.dumps({"question": f"Story {i}:"}) + "\n" for i in range(200)))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pi_slow.yaml").write_text(SLOW_GEN.format(data=data))
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=3, batch_size=1, timeout_s=timeout_s, ignore_eos=True)
    procs = start_eval(cfg, tmp_path, 3, tasks=["pi_slow"], task_dir=str(tmp_path / "tasks"),
                       model_args=",max_gen_toks=200")
    try:
        deadline = time.monotonic() + 180
        while "pipeinfer generate_until" not in _stderr_so_far(procs[0]):
            assert time.monotonic() < deadline and procs[0].poll() is None, _stderr_so_far(procs[0])[-2000:]
            time.sleep(0.1)
        time.sleep(1)
        os.kill(procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        survivors = finish([procs[0], procs[2]], timeout=timeout_s + 60)
        assert time.monotonic() - t0 < timeout_s + 30
    finally:
        finish(procs, timeout=5)
    for (code, err), peers in zip(survivors, (("rank 1", "rank 2"), ("rank 1",))):
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 1 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
        # names the peer it lost: the killed rank, or (rank 0) the last rank, which left when it lost rank 1
        assert any(f"{p} is gone" in errors[0] or f"{p} " in errors[0].split(":", 2)[-1] for p in peers), errors
    assert not glob.glob(str(tmp_path / "eval" / "**" / "results_*.json"), recursive=True)


def _stderr_so_far(proc) -> str:
    """A running rank's stderr (the test fork server writes it to a file)."""
    try:
        with open(proc.err, errors="replace") as f:
            return f.read()
    except (AttributeError, OSError):
        return ""


def test_installed_package_runs_under_lm_evals_own_command(tiny_llama, task_dir, tmp_path):
    """pip install of the package (a wheel built here, offline): lm-eval's own command line finds
    --model pipeinfer (pipeinfer_lmeval.pth, evaluate/plugin.py) and, at pipeline_size 1 in one
    process, gives the hf backend's numbers (on the multiple-choice task: the path is what is new)."""
    import shutil

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "requirements.txt"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "pipeinfer"), src / "pipeinfer", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "wheels"), str(src)], capture_output=True, text=True, timeout=300)
    require(None if built.returncode == 0 else f"cannot build the wheel offline: {built.stderr.strip()[-300:]}")
    site_dir = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site_dir),
                                *glob.glob(str(tmp_path / "wheels" / "*.whl"))], capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    cfg = base_config(tiny_llama, tmp_path, dtype="float32", batch_size=4)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    # site.addsitedir reads the installed .pth as site-packages would; the checkout is not on the path
    lm_eval_cli = (f"import site, sys; site.addsitedir({str(site_dir)!r}); import pipeinfer; "
                   f"assert pipeinfer.__file__.startswith({str(site_dir)!r}), pipeinfer.__file__; "
                   "from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    res = subprocess.run([sys.executable, "-c", lm_eval_cli, "--model", "pipeinfer", "--model_args",
                          f"config={tmp_path / 'cfg.json'}", "--tasks", "pi_mc", "--include_path", task_dir,
                          "--output_path", str(tmp_path / "eval"), "--log_samples"], cwd=str(tmp_path),
                         capture_output=True, text=True, timeout=300, env=dict(env, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same(read_eval(tmp_path / "eval", ["pi_mc"]), reference(tiny_llama, task_dir), ["pi_mc"])


def test_submit_sbatch_eval_mode_starts_the_evaluation_on_every_rank(tmp_path):
    """submit.sbatch with EVAL_ARGS (outside Slurm: scontrol and srun stand-ins, srun printing the
    rank command): each rank runs run.sh with python -m pipeinfer.evaluate as its runner, the
    config and the --set overrides as model args; bad extra arguments are one line, exit 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"scontrol": '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && { echo node1; echo node2; }\nexit 0\n',
             "srun": '#!/bin/sh\necho "rank-runner $RUNNER"\nshift\necho "rank-args $*"\nexit 0\n'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "model").mkdir()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(model_path=str(tmp_path / "model"), pipeline_size=2,
                                      output_path=str(tmp_path / "out" / "run.jsonl"))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "APPTAINER", "RUNNER"))}
    env.update(PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:/usr/bin:/bin", SLURM_JOB_ID="4242",
               SLURM_NTASKS="2", SLURM_JOB_NODELIST="node[1-2]", CONTAINER_IMAGE="none", MODULES="",
               EXP_CONFIG=str(config), PYTHON=sys.executable, EVAL_ARGS="--tasks pi_mc --output_path results/eval")

    def job(*args):
        return subprocess.run(["bash", os.path.join(ROOT, "submit.sbatch"), *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    done = job("--set", "dtype=float32")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith("rank-"))
    assert lines["rank-runner"] == f"{sys.executable} -m pipeinfer.evaluate"
    assert lines["rank-args"] == (f"{ROOT}/run.sh --model_args config={config},dtype=float32 --tasks pi_mc "
                                  "--output_path results/eval")
    assert "append-sacct" not in done.stdout
    bad = job("--tasks", "x")  # lm-eval's arguments go in EVAL_ARGS; the config's checker refuses them here
    assert bad.returncode == 2 and "unrecognized arguments: --tasks x" in bad.stderr, bad.stderr


SLOW_TASK = mc_task("pi_slow", "!function slow.text")


def test_a_long_pause_in_the_harness_keeps_every_rank(tiny_llama, task_dir, tmp_path):
    """The harness builds its requests for longer than timeout_s (a slow doc_to_text, as a large
    suite's task loading is) before its first call: the other ranks, waiting on rank 0, hear
    keep-alive headers meanwhile, and the evaluation ends with hf's numbers."""
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (d / "slow.py").write_text("import time\n\n\ndef text(doc):\n    time.sleep(1.5)\n    return doc['question']\n")
    (d / "pi_slow.yaml").write_text(SLOW_TASK.format(data=d))
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, dtype="float32", batch_size=4, timeout_s=4)
    results = finish(start_eval(cfg, tmp_path, 2, tasks=["pi_slow"], task_dir=str(d)))
    assert [code for code, _ in results] == [0, 0], "\n".join(err[-3000:] for _, err in results)
    metrics, samples = read_eval(tmp_path / "eval", ["pi_slow"])
    assert_same(({"pi_mc": dict(metrics["pi_slow"], alias="pi_mc", name="pi_mc")}, {"pi_mc": samples["pi_slow"]}),
                reference(tiny_llama, task_dir, ["pi_mc"]), ["pi_mc"])
