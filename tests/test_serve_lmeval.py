"""lm-eval's own `local-completions` model (its OpenAI-completions client: echo, logprobs=1,
max_tokens 1, token-id prompts) against the server (python -m pipeinfer.serve) on a real loopback
port gives the same loglikelihood results as the `pipeinfer` lm-eval backend: the same acc and
acc_norm, and per sample the same log-likelihoods and is_greedy flags (--log_samples). is_greedy
comes from each prompt token's top_logprobs entry (scoring.py's argmax), so the task holds
choices that are the model's greedy continuation as well as choices that are not.

    pytest tests/test_serve_lmeval.py
"""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from conftest import require
from test_lmeval import MISSING, _by_doc, _resps, mc_task, run_eval
from test_serve import start_server

MC = [
    {"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
    {"question": "Two plus two equals ", "choices": ["four", "five", "twenty two"], "answer": 1},
    {"question": "Pipeline parallel inference splits", "choices": [" layers", " tokens"], "answer": 0},
    {"question": "A" * 3, "choices": [" a", " a b", " a b c"], "answer": 2},  # continuations sharing a prefix
]
API_MISSING = next((f"lm-eval's local-completions model needs {p}: pip install -r requirements-dev.txt"
                    for p in ("tenacity", "aiohttp") if find_spec(p) is None), None)
GREEDY_FROM = ["Hello", "Once upon a time", "The quick brown fox"]  # + the model's own greedy continuation

YAML = mc_task("pi_mc_api")


def greedy_docs(model: str) -> list[dict]:
    """Questions whose first choice is what greedy decoding continues them with (1 and 3 tokens:
    is_greedy true), beside a choice that is not."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=torch.float32).eval()
    docs = []
    for i, q in enumerate(GREEDY_FROM):
        ids = tok(q, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1 + 2 * (i % 2),
                              pad_token_id=tok.pad_token_id, eos_token_id=None)
        docs.append({"question": q, "choices": [tok.decode(out[0, ids.shape[1]:]), " zebra"], "answer": i % 2})
    return docs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_llama):
    require(MISSING or API_MISSING)
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC + greedy_docs(tiny_llama)))
    (d / "pi_mc_api.yaml").write_text(YAML.format(data=d))
    return str(d)


def local_completions(model: str, task_dir: str, url: str) -> tuple[dict, list]:
    """lm-eval's local-completions model in this process, against the server at url."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,tokenizer={model},batch_size=3"
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["pi_mc_api"], log_samples=True,
                                  task_manager=TaskManager(include_path=task_dir))
    return out["results"]["pi_mc_api"], _by_doc(out["samples"]["pi_mc_api"])


def test_local_completions_equals_the_pipeinfer_backend(tiny_llama, task_dir, tmp_path, monkeypatch):
    """The server at pipeline_size 2 (echo's scores from the last stage, over the wire to the first),
    the backend at 1 (the rows schedule on one rank): one model, one set of numbers."""
    for k, v in dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                     HF_DATASETS_CACHE=str(tmp_path / "hf-datasets")).items():
        monkeypatch.setenv(k, v)
    (tmp_path / "serve").mkdir()
    (tmp_path / "backend").mkdir()
    server = start_server(tiny_llama, tmp_path / "serve", 2)
    try:
        got, got_samples = local_completions(tiny_llama, task_dir, server.url)
    finally:
        codes = server.stop()
    assert [c for c, _ in codes] == [0, 0], "\n".join(e[-2000:] for _, e in codes)
    metrics, samples = run_eval(tiny_llama, task_dir, tmp_path / "backend", 1, tasks=["pi_mc_api"])
    want, want_samples = metrics["pi_mc_api"], samples["pi_mc_api"]
    assert {k: got[k] for k in ("acc,none", "acc_norm,none")} == {k: want[k] for k in ("acc,none", "acc_norm,none")}
    assert len(got_samples) == len(want_samples) == len(MC) + len(GREEDY_FROM)
    flags = []
    for g, w in zip(got_samples, want_samples):
        assert g["doc_id"] == w["doc_id"] and len(_resps(g)) == len(_resps(w))
        for (g_ll, g_greedy), (w_ll, w_greedy) in zip(_resps(g), _resps(w)):
            assert float(g_ll) == pytest.approx(float(w_ll), abs=1e-4), g["doc_id"]
            assert str(g_greedy) == str(w_greedy), g["doc_id"]
            flags.append(str(w_greedy))
    assert "True" in flags and "False" in flags  # both ways of is_greedy were compared
