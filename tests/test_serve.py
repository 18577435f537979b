"""The OpenAI-compatible server (python -m pipeinfer.serve): real rank processes, a real HTTP server
on a loopback port, the official `openai` client. Greedy answers equal whole-model generate(),
echo's prompt log-probabilities equal the batch runner's, bad requests get a 4xx JSON error and
the server keeps serving, a dead peer ends every open stream with an error and every rank exits.

    pytest tests/test_serve.py
"""

from __future__ import annotations

import copy
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PROMPTS, ROOT, free_port, prompt_records, rank_env, run_pipeline, start_rank

openai = pytest.importorskip("openai")

SERVE = f"{ROOT}/pipeinfer/serve/__main__.py"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<|assistant|>{% endif %}"
LONGEST = 100  # max_prompt_tokens: the plan sizes every row's KV cache for this many prompt tokens
KEY = "test-key-123"
CHATS = [[{"role": "user", "content": "Hello"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}]]


class Server:
    def __init__(self, ranks, port: int, cfg: dict, key: str | None):
        self.ranks, self.port, self.cfg, self.key = ranks, port, cfg, key
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=self.key or "none", max_retries=0, timeout=60, **kw)

    def post(self, path: str, body: bytes, key: str | None = "default") -> tuple[int, dict]:
        key = self.key if key == "default" else key
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str) -> float:
        _, text = self.get("/metrics")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    def stop(self, timeout: float = 60) -> list[tuple[int, str]]:
        for r in self.ranks:
            r.send_signal(signal.SIGTERM)
        out = []
        try:
            for r in self.ranks:
                _, err = r.communicate(timeout=timeout)
                out.append((r.returncode, err))
        finally:
            for r in self.ranks:
                r.kill()
        return out


def start_server(model: str, tmp_path, world: int, key: str | None = None, **over) -> Server:
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    cfg = dict(model_path=model, pipeline_size=world, max_prompt_tokens=LONGEST, max_new_tokens=12, batch_size=4,
               logprobs=5, prompt_logprobs=True, chat_template=str(tmp_path / "chat.jinja"), timeout_s=60,
               max_queued_requests=32,
               output_path=str(tmp_path / "unused.jsonl"), offload_folder=str(tmp_path / "offload"))
    cfg.update(over)
    path = tmp_path / f"serve-{world}.json"
    path.write_text(json.dumps(cfg))
    rdv, port = free_port(), free_port()
    envs = [dict(rank_env(r, world, rdv), **({"PIPEINFER_API_KEY": key} if key else {})) for r in range(world)]
    ranks = [start_rank([SERVE, "--config", str(path), "--port", str(port)], env) for env in envs]
    server = Server(ranks, port, cfg, key)
    end = time.monotonic() + 120
    while time.monotonic() < end:
        if any(r.poll() is not None for r in ranks):
            errs = [r.communicate(timeout=30)[1][-2000:] for r in ranks if r.poll() is not None]
            server.stop(5)
            pytest.fail("a server rank exited while starting:\n" + "\n".join(errs))
        try:
            if server.get("/health")[0] == 200:
                return server
        except OSError:
            pass
        time.sleep(0.2)
    server.stop(5)
    pytest.fail("the server was not healthy within 120 s")


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module", params=[1, 2], ids=["pp1", "pp2"])
def server(request, model, tmp_path_factory):
    s = start_server(model, tmp_path_factory.mktemp(f"serve{request.param}"), request.param, KEY)
    yield s
    codes = s.stop()
    assert [c for c, _ in codes] == [0] * request.param, "\n".join(e[-2000:] for _, e in codes)


@pytest.fixture(scope="module")
def reference(model):
    """Whole-model greedy generate() from given ids, and the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=torch.float32).eval()

    def generate(ids: list[int], n: int, ignore_eos: bool = False) -> list[int]:
        gc = copy.deepcopy(lm.generation_config)
        if ignore_eos:  # decode past EOS, as the server's ignore_eos does
            gc.eos_token_id = None
        with torch.no_grad():
            out = lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              generation_config=gc, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
        return out[0, len(ids):].tolist()

    def chat_ids(messages) -> list[int]:
        text = tok.apply_chat_template(messages, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False)["input_ids"]

    def log_softmax(ids: list[int]):
        with torch.no_grad():
            return torch.log_softmax(lm(torch.tensor([ids])).logits[0].float(), -1)  # (T, V)

    generate.tok, generate.chat_ids, generate.log_softmax = tok, chat_ids, log_softmax
    return generate


def _text(tok, ids: list[int]) -> str:
    if ids and ids[-1] == tok.eos_token_id:
        ids = ids[:-1]
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_completions_equal_generate(server, reference, stream):
    tok, client = reference.tok, server.client()
    for n, prompt in zip([12, 5, 9, 1], PROMPTS):
        want = reference(tok(prompt)["input_ids"], n)
        if stream:
            chunks = list(client.completions.create(model="llama5", prompt=prompt, max_tokens=n, stream=True,
                                                    stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ("stop" if len(want) < n
                                                                                     else "length")
            usage = chunks[-1].usage
        else:
            out = client.completions.create(model="llama5", prompt=prompt, max_tokens=n, logprobs=0)
            text, usage = out.choices[0].text, out.usage
            assert len(out.choices[0].logprobs.token_logprobs) == len(want)
        assert text == _text(tok, want)
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(tok(prompt)["input_ids"]), len(want))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_completions_equal_generate(server, reference, stream):
    tok, client = reference.tok, server.client()
    for messages in CHATS:
        ids = reference.chat_ids(messages)
        want = reference(ids, 12)
        if stream:
            chunks = list(client.chat.completions.create(model="llama5", messages=messages, max_tokens=12,
                                                         stream=True, logprobs=True, top_logprobs=2))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            toks = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
            assert len(toks) == len(want) and all(len(e.top_logprobs) == 2 for e in toks)
        else:
            out = client.chat.completions.create(model="llama5", messages=messages, max_tokens=12)
            text = out.choices[0].message.content
            assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), len(want))
        assert text == _text(tok, want)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_stop_string_ends_the_text_before_it(server, reference, stream):
    """OpenAI's rule: the answer stops before the stop string, finish_reason "stop"."""
    tok = reference.tok
    for prompt in PROMPTS:  # a printable character the greedy answer makes after its first two
        text = _text(tok, reference(tok(prompt)["input_ids"], 12))
        stops = [c for c in text[2:] if c.isascii() and c.isprintable() and not c.isspace()]
        if stops:
            break
    assert stops, "no greedy answer has a printable ASCII character to stop at"
    want = text[:text.index(stops[0])]
    out = server.client().completions.create(model="llama5", prompt=prompt, max_tokens=12, stop=[stops[0]],
                                             stream=stream)
    if stream:
        chunks = list(out)
        got, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        got, reason = out.choices[0].text, out.choices[0].finish_reason
    assert (got, reason) == (want, "stop")


def test_token_id_prompts_and_several_choices(server, reference):
    """lm-eval's tokenized requests: a list of token-id prompts, one choice each, in order."""
    tok = reference.tok
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    out = server.client().completions.create(model="llama5", prompt=ids, max_tokens=6)
    assert [c.index for c in out.choices] == list(range(len(ids)))
    assert [c.text for c in out.choices] == [_text(tok, reference(i, 6)) for i in ids]


def test_echo_logprobs_equal_the_batch_runners_prompt_logprobs(server, model, reference, tmp_path):
    """lm-eval's loglikelihood request (echo, logprobs=1, max_tokens 1 or 0) against the batch
    runner's prompt_logprobs for the same prompts; each prompt token's top_logprobs holds its
    position's argmax as whole-model log-softmax has it, and the token itself."""
    cfg = dict(model_path=model, prompts=PROMPTS, max_new_tokens=1, prompt_logprobs=True, batch_size=2,
               output_path=str(tmp_path / "run.jsonl"), offload_folder=str(tmp_path / "off"), timeout_s=60)
    runner = prompt_records(run_pipeline(cfg, tmp_path, 1))
    client = server.client()
    for max_tokens in (1, 0):
        out = client.completions.create(model="llama5", prompt=PROMPTS, max_tokens=max_tokens, logprobs=1, echo=True)
        for choice, rec, prompt in zip(out.choices, runner, PROMPTS):
            n = rec["prompt_tokens"]
            lp = choice.logprobs.token_logprobs
            assert len(lp) == n + max_tokens and lp[0] is None
            assert lp[1:n] == pytest.approx(rec["prompt_logprobs"][1:], abs=1e-5)
            ids = reference.tok(prompt)["input_ids"]
            whole, tops = reference.log_softmax(ids), choice.logprobs.top_logprobs
            assert tops[0] is None and len(ids) == n
            for j in range(1, n):
                best = whole[j - 1].max(-1)
                want = {reference.tok.decode([int(best.indices)]): float(best.values)}
                want.setdefault(choice.logprobs.tokens[j], lp[j])
                assert tops[j] == pytest.approx(want, abs=1e-5), (prompt, j)
            assert choice.text.startswith(prompt)
            if max_tokens:
                assert choice.text == prompt + rec["output_text"]


def test_32_concurrent_clients(server, reference):
    tok, client = reference.tok, server.client()
    jobs = [(PROMPTS[i % len(PROMPTS)], 1 + i % 12) for i in range(32)]

    def one(job):
        prompt, n = job
        if n % 2:
            return "".join(c.choices[0].text for c in
                           client.completions.create(model="llama5", prompt=prompt, max_tokens=n, stream=True))
        return client.completions.create(model="llama5", prompt=prompt, max_tokens=n).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, jobs))
    assert got == [_text(tok, reference(tok(p)["input_ids"], n)) for p, n in jobs]
    assert 0 < server.metric("pipeinfer_rows_in_flight_max") <= server.cfg["batch_size"]
    assert 0 < server.metric("pipeinfer_kv_positions_max") <= LONGEST + server.cfg["max_new_tokens"]  # the plan's
    assert server.metric("pipeinfer_requests_running") == 0


BAD = [  # (path, body, field named, status)
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi"', None, 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "bogus": 1}', "bogus", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "max_tokens": -1}', "max_tokens", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "max_tokens": 100000}', "max_tokens", 400),
    ("/v1/completions", json.dumps({"model": "llama5", "prompt": "y" * (LONGEST + 5)}).encode(), "prompt", 400),
    ("/v1/completions", b'{"model": "gpt-4", "prompt": "Hi"}', "model", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "\xff\xfe"}', None, 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "\\ud800"}', "prompt", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "n": 2}', "n", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "temperature": 0.7}', "temperature", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "logprobs": 9}', "logprobs", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": [99999]}', "prompt", 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "max_tokens": 0}', "max_tokens", 400),
    ("/v1/completions", b'[1, 2]', None, 400),
    ("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]}', "stop", 400),
    ("/v1/chat/completions", b'{"model": "llama5", "messages": []}', "messages", 400),
    ("/v1/chat/completions", b'{"model": "llama5", "messages": [{"role": "user"}]}', "messages.0.content", 400),
    ("/v1/completions", json.dumps({"model": "llama5", "prompt": ["Hi"] * 33}).encode(), None, 429),
]


@pytest.mark.parametrize("path,body,param,status", BAD, ids=[f"{i}-{b[2] or 'body'}" for i, b in enumerate(BAD)])
def test_bad_request_is_a_json_error_and_the_server_goes_on(server, reference, path, body, param, status):
    code, err = server.post(path, body)
    assert code == status, err
    assert set(err["error"]) >= {"message", "type", "param"} and err["error"]["message"]
    assert err["error"]["param"] == param
    out = server.client().completions.create(model="llama5", prompt="Hello", max_tokens=3)
    assert out.choices[0].text == _text(reference.tok, reference(reference.tok("Hello")["input_ids"], 3))


def test_api_key(server):
    body = b'{"model": "llama5", "prompt": "Hi", "max_tokens": 1}'
    assert server.post("/v1/completions", body, key=None)[0] == 401
    code, err = server.post("/v1/completions", body, key="wrong")
    assert code == 401 and err["error"]["type"] == "authentication_error"
    assert server.post("/v1/completions", body)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_models_health_metrics(server):
    assert [m.id for m in server.client().models.list().data] == ["llama5"]
    assert server.get("/health")[0] == 200
    code, text = server.get("/metrics")
    assert code == 200
    for name in ("pipeinfer_requests_running", "pipeinfer_requests_waiting", "pipeinfer_generation_tokens_total",
                 "pipeinfer_time_to_first_token_seconds_bucket", "pipeinfer_time_per_output_token_seconds_count",
                 "pipeinfer_stage_seconds_total"):
        assert name in text


def test_the_micro_batches_schedule_serves_too(model, tmp_path, reference):
    """schedule "micro_batches" (the fallback for families rows cannot run): tokens reach a stream
    when its prompt finishes, and answers still equal generate()."""
    s = start_server(model, tmp_path, 2, KEY, schedule="micro_batches")
    try:
        tok, client = reference.tok, s.client()
        for n, prompt in zip([12, 5], PROMPTS):
            want = _text(tok, reference(tok(prompt)["input_ids"], n))
            chunks = list(client.completions.create(model="llama5", prompt=prompt, max_tokens=n, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == want
            assert client.completions.create(model="llama5", prompt=prompt, max_tokens=n).choices[0].text == want
    finally:
        codes = s.stop()
    assert [c for c, _ in codes] == [0, 0], "\n".join(e[-2000:] for _, e in codes)


def _first_chunks(client, n: int, max_tokens: int):
    """n streams started, each past its first chunk."""
    streams = [client.completions.create(model="llama5", prompt=PROMPTS[i % 4], max_tokens=max_tokens,
                                         stream=True) for i in range(n)]
    for s in streams:
        next(iter(s))
    return streams


def test_sigterm_drains_running_streams_and_a_closed_stream_frees_its_row(model, tmp_path, reference):
    """On a sampling server (do_sample=true) too: temperature 0 is greedy, a seed repeats an answer."""
    s = start_server(model, tmp_path, 2, max_new_tokens=150, ignore_eos=True, timeout_s=30, do_sample=True)
    try:
        client = s.client()
        tok = reference.tok
        greedy = client.completions.create(model="llama5", prompt="Hello", max_tokens=8, temperature=0)
        assert greedy.choices[0].text == tok.decode(reference(tok("Hello")["input_ids"], 8, ignore_eos=True),
                                                    skip_special_tokens=True)
        seeded = [client.completions.create(model="llama5", prompt="Hello", max_tokens=8, temperature=1.0,
                                            seed=7).choices[0].text for _ in range(2)]
        assert seeded[0] == seeded[1]
        code, err = s.post("/v1/completions", b'{"model": "llama5", "prompt": "Hi", "temperature": 0, "logprobs": 1}')
        assert code == 400 and err["error"]["param"] == "temperature"
        gone = client.completions.create(model="llama5", prompt="Hello", max_tokens=150, stream=True)
        next(iter(gone))
        gone.close()  # the client goes away: its row is freed at its next visit, finish_reason "abort"
        end = time.monotonic() + 20
        while s.metric('pipeinfer_requests_finished_total{finish_reason="abort"}') < 1 and time.monotonic() < end:
            time.sleep(0.1)
        assert s.metric('pipeinfer_requests_finished_total{finish_reason="abort"}') == 1
        streams = _first_chunks(client, 3, 150)
        results = {}

        def read(i, st):
            chunks = list(st)
            results[i] = (len(chunks) > 1, chunks[-1].choices[0].finish_reason)

        threads = [threading.Thread(target=read, args=(i, st)) for i, st in enumerate(streams)]
        for t in threads:
            t.start()
        codes = s.stop(timeout=60)  # SIGTERM to every rank, as srun sends it
        for t in threads:
            t.join(30)
    finally:
        for r in s.ranks:
            r.kill()
    assert [c for c, _ in codes] == [0, 0], "\n".join(e[-2000:] for _, e in codes)
    assert results == {i: (True, "length") for i in range(3)}


def test_a_dead_stage_rank_ends_open_streams_with_an_error(model, tmp_path):
    """After idling past timeout_s (the engine's keep-alive headers hold the ranks' bounded waits)."""
    s = start_server(model, tmp_path, 2, max_new_tokens=150, ignore_eos=True, timeout_s=8)
    try:
        time.sleep(10)
        assert s.get("/health")[0] == 200
        streams = _first_chunks(s.client(), 3, 150)
        t0 = time.monotonic()
        s.ranks[1].kill()
        for st in streams:
            with pytest.raises((openai.APIError, openai.APIConnectionError)):
                for _ in st:
                    pass
        _, err = s.ranks[0].communicate(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        for r in s.ranks:
            r.kill()
    assert s.ranks[0].returncode == 1
    assert elapsed < s.cfg["timeout_s"] + 5
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "rank 1" in lines[0], err[-2000:]
