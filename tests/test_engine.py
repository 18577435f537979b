"""The engine from Python, as the README shows it: every rank starts it, the first submits requests
(some while others run, some after a first round is over) and reads results as they finish, the
others serve; each prompt's greedy tokens equal whole-model generate() with its own max_new_tokens.

    pytest tests/test_engine.py
"""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import PROMPTS, base_config, free_port, rank_env, reference_outputs, start_rank

SCRIPT = textwrap.dedent('''
    import json, sys
    from pipeinfer.engine import Engine
    from pipeinfer.run.prompts import Limits, PromptSpec

    config, requests, out = sys.argv[1:4]
    with open(requests) as f:
        reqs = [PromptSpec(p, limits=Limits(max_new_tokens=n)) for p, n in json.load(f)]
    first, late, after = reqs[:3], reqs[3:6], reqs[6:]
    with Engine.start(config) as engine:
        if engine.is_first:
            got = []
            for r in first:
                engine.submit(r)
            for batch, result in engine.results():
                got += [{"index": i, "ids": ids, "finish": list(f)}
                        for i, ids, f in zip(batch.indices, result.output_ids, result.finish)]
                for r in late:  # requests that arrive while others run
                    engine.submit(r)
                late = []
            for rec in engine.generate(after):  # a second round, after the first is over
                got.append({"index": rec["prompt_index"], "ids": rec["output_ids"],
                            "finish": [rec["finish_reason"], rec["stop_reason"]]})
            with open(out, "w") as f:
                json.dump({"got": got, "in_flight": engine.max_in_flight}, f)
        else:
            engine.serve()
''')

REQUESTS = [(p, n) for p, n in zip(PROMPTS + PROMPTS[::-1], [9, 2, 5, 1, 12, 3, 6, 4])] + [("x", 7)]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return [reference_outputs(tiny_llama, [p], n)[0] for p, n in REQUESTS]


@pytest.mark.parametrize("pipeline_size,batch_size", [(1, 3), (2, 1), (2, 3), (3, 3)])
def test_engine_from_python_matches_generate(tiny_llama, reference, tmp_path, pipeline_size, batch_size):
    # no prompts in the config: the plan makes room for max_prompt_tokens + max_new_tokens per row
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=pipeline_size, batch_size=batch_size, max_new_tokens=12,
                      prompts=None, max_prompt_tokens=48)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "req.json").write_text(json.dumps(REQUESTS))
    (tmp_path / "script.py").write_text(SCRIPT)
    out = tmp_path / "got.json"
    port = free_port()
    ranks = [start_rank([str(tmp_path / "script.py"), str(tmp_path / "cfg.json"), str(tmp_path / "req.json"),
                         str(out)], rank_env(r, pipeline_size, port)) for r in range(pipeline_size)]
    try:
        results = [r.communicate(timeout=240) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    assert [r.returncode for r in ranks] == [0] * pipeline_size, "\n".join(e[-2000:] for _, e in results)
    data = json.loads(out.read_text())
    got = sorted(data["got"], key=lambda g: g["index"])
    assert [g["index"] for g in got] == list(range(len(REQUESTS)))
    assert [g["ids"] for g in got] == reference
    assert all(g["finish"] == ["length", None] for g in got)
    assert 0 < data["in_flight"] <= batch_size


def test_engine_refuses_a_bad_request_and_waits_for_late_ones(tiny_llama, tmp_path):
    """In one process (pipeline_size 1): a request that cannot run raises at submit() with nothing
    queued; results(wait=True) in one thread serves requests another thread submits until close()."""
    import threading

    from pipeinfer.config import ConfigError
    from pipeinfer.engine import Engine
    from pipeinfer.run.prompts import Limits, PromptSpec

    cfg = base_config(tiny_llama, tmp_path, max_new_tokens=5, prompts=None, max_prompt_tokens=48)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with Engine.start(str(tmp_path / "cfg.json")) as engine:
        assert (engine.max_prompt_tokens, engine.max_new_tokens) == (48, 5)
        with pytest.raises(ConfigError, match=r"has \d+ tokens, above the 48 the plan makes room for: shorten it, or "
                                              "raise max_prompt_tokens"):
            engine.submit(PROMPTS[-1] * 2)
        with pytest.raises(ConfigError, match="max_new_tokens=6, above the 5 the plan makes room for"):
            engine.submit(PromptSpec("a", limits=Limits(max_new_tokens=6)))
        with pytest.raises(ConfigError, match="max_new_tokens=-1 is out of range"):
            engine.submit(PromptSpec("a", limits=Limits(max_new_tokens=-1)))
        with pytest.raises(ConfigError, match="sets temperature but do_sample=false"):
            engine.submit(PromptSpec("a", limits=Limits(temperature=0.5)))
        got = []

        def loop():
            for batch, result in engine.results(wait=True):
                got.extend(zip(batch.indices, result.output_ids))

        t = threading.Thread(target=loop)
        t.start()
        for p in PROMPTS:
            engine.submit(PromptSpec(p, limits=Limits(max_new_tokens=5)))
        engine.close()
        t.join(timeout=120)
        assert not t.is_alive()
        assert engine.prompts == {}  # handed back, then forgotten: a long-lived engine does not grow
    assert sorted(got) == list(enumerate(reference_outputs(tiny_llama, PROMPTS, 5)))
