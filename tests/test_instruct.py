"""Instruct and evaluation workloads, end to end over real ranks, against whole-model transformers:
chat messages through Llama-3 and ChatML style templates (never two BOS), stop strings and stop
token ids with finish reasons, and the log-probabilities of generated tokens.

    pytest tests/test_instruct.py
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import TINY, base_config, launch, prompt_records, run_pipeline, set_eos_token

SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|im_start|>",
            "<|im_end|>"]
# The two template styles most instruct checkpoints use: Llama 3 (the template writes BOS, and the
# tokenizer also adds one to plain text) and ChatML (Qwen: no BOS at all).
LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fox."}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c?"}],
]
VOCAB = 320  # room for the tokenizers' added tokens (the embedding may be larger than the tokenizer)


def chat_tokenizer(style: str, template: bool = True):
    """The byte-level test tokenizer with Llama-3 or ChatML specials and template, as real ones ship."""
    from tokenizers.processors import TemplateProcessing

    from pipeinfer.models.tiny import make_tokenizer

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    if style == "llama3":  # Llama 3's tokenizer.json adds <|begin_of_text|> to every text
        bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
        tok.bos_token = "<|begin_of_text|>"
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        tok.chat_template = LLAMA3 if template else None
    else:
        tok.chat_template = CHATML if template else None
    return tok


@pytest.fixture(scope="module")
def chat_weights(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "chat-weights"), seed=3, vocab_size=VOCAB, **TINY)


def with_tokenizer(weights: str, path: str, tok) -> str:
    shutil.copytree(weights, path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["llama3", "chatml"])
def chat_model(request, chat_weights, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("models") / request.param)
    return with_tokenizer(chat_weights, path, chat_tokenizer(request.param))


def template_ids(model: str, messages: list[dict]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding from 5.x, a list in 4.57


def generate_from_ids(model_path: str, inputs: list[list[int]], max_new_tokens: int, **kw) -> list[list[int]]:
    """Whole-model greedy generate() from given ids, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True, dtype=torch.float32).eval()
    outs = []
    for ids in inputs:
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                                 pad_token_id=0, **kw)
        outs.append(out[0, len(ids):].tolist())
    return outs


def test_prepare_gives_the_template_ids_and_one_bos(chat_weights, tmp_path):
    """Stage 0's ids are apply_chat_template(..., tokenize=True)'s; a hand-rendered Llama-3 prompt
    given as a plain string keeps its one BOS, where the tokenizer alone would make it two."""
    from transformers import AutoTokenizer

    from pipeinfer.config import build_config
    from pipeinfer.run.prompts import load_prompts, prepare

    for style in ("llama3", "chatml"):
        path = with_tokenizer(chat_weights, str(tmp_path / style), chat_tokenizer(style))
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        rendered = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
        cfg = build_config({"model_path": path, "prompts": [*CHATS, rendered, "plain text"]})
        prompts = prepare(tok, load_prompts(cfg), cfg)
        assert [p.ids for p in prompts[:3]] == [template_ids(path, m) for m in CHATS]
        assert prompts[3].ids == prompts[0].ids and prompts[3].text == prompts[0].text
        assert prompts[4].ids == tok("plain text")["input_ids"]  # plain text: as the tokenizer intends
        if style == "llama3":
            bos = tok.bos_token_id
            assert tok(rendered)["input_ids"][:2] == [bos, bos], "the old path (tokenizer(text)) gave two BOS"
            assert prompts[3].ids[:2] == [bos, tok.convert_tokens_to_ids("<|start_header_id|>")]
            assert prompts[4].ids[0] == bos
        else:
            assert tok.bos_token_id not in prompts[0].ids



PREFILLED = [[{"role": "user", "content": "Name a fox."}, {"role": "assistant", "content": "The fox is"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "It is "}]]


def test_a_final_assistant_message_is_continued(chat_model, tmp_path):
    """Messages that end with the assistant's (a prefilled answer) are continued, not answered
    anew: stage 0's ids are apply_chat_template(..., continue_final_message=True)'s, and the
    outputs generate()'s from them, at pipeline_size 2, beside a chat that ends with the user."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model, local_files_only=True)

    def continued(messages):
        out = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    inputs = [continued(m) for m in PREFILLED] + [template_ids(chat_model, CHATS[0])]
    assert all(tok.decode(ids).rstrip().endswith(m[-1]["content"].rstrip()) for ids, m in zip(inputs, PREFILLED))
    cfg = base_config(chat_model, tmp_path, prompts=[*PREFILLED, CHATS[0]], pipeline_size=2, batch_size=3,
                      max_new_tokens=6)
    records = prompt_records(run_pipeline(cfg, tmp_path, 2))
    assert [r["prompt_tokens"] for r in records] == [len(ids) for ids in inputs]
    assert [r["output_ids"] for r in records] == generate_from_ids(chat_model, inputs, 6)


@pytest.mark.parametrize("pipeline_size,batch_size", [(1, 1), (1, 3), (2, 1), (2, 3), (3, 1), (3, 3)])
def test_chat_messages_match_generate(chat_model, tmp_path, pipeline_size, batch_size):
    """Messages in a .jsonl prompts_file (beside a plain string): every record's output is
    generate()'s from apply_chat_template's ids; the record keeps the messages as given."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(chat_model, local_files_only=True)
    rendered = tok.apply_chat_template(CHATS[1], add_generation_prompt=True, tokenize=False)
    lines = [{"messages": m} for m in CHATS] + [{"prompt": rendered}]
    pfile = tmp_path / "chats.jsonl"
    pfile.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = base_config(chat_model, tmp_path, prompts=None, prompts_file=str(pfile), pipeline_size=pipeline_size,
                      batch_size=batch_size, max_new_tokens=8)
    records = prompt_records(run_pipeline(cfg, tmp_path, pipeline_size))
    inputs = [template_ids(chat_model, m) for m in CHATS] + [template_ids(chat_model, CHATS[1])]
    assert [r["output_ids"] for r in records] == generate_from_ids(chat_model, inputs, 8)
    assert [r["prompt_tokens"] for r in records] == [len(ids) for ids in inputs]
    assert [r["prompt"] for r in records] == CHATS + [rendered]
    assert records[1]["prompt_sha256"] == records[3]["prompt_sha256"]  # the same rendered text


def test_system_prompt_template_file_and_resume(chat_weights, tmp_path):
    """chat_template from a file, system_prompt added where a prompt has none; a rerun resumes on
    the rendered text's hash, and an edited template file refuses the resume (the texts changed)."""
    path = with_tokenizer(chat_weights, str(tmp_path / "model"), chat_tokenizer("chatml", template=False))
    tok = chat_tokenizer("chatml")
    (tmp_path / "t.jinja").write_text(CHATML)
    cfg = base_config(path, tmp_path, prompts=CHATS, chat_template=str(tmp_path / "t.jinja"),
                      system_prompt="You are terse.", max_new_tokens=6, batch_size=3)
    first = prompt_records(run_pipeline(cfg, tmp_path, 1))
    sys_msg = {"role": "system", "content": "You are terse."}
    want = [[sys_msg, *m] if m[0]["role"] != "system" else m for m in CHATS]
    inputs = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False))
              for m in want]
    assert [r["output_ids"] for r in first] == generate_from_ids(path, inputs, 6)
    again = run_pipeline(cfg, tmp_path, 1)  # everything recorded: nothing to do, nothing appended
    assert len(prompt_records(again)) == len(CHATS)
    (tmp_path / "t.jinja").write_text(CHATML.replace("<|im_start|>assistant", "<|im_start|>model"))
    res = launch(cfg, tmp_path, 1)
    assert res[0].returncode == 2 and "prompt_index=0 for a prompt that is not in this run's input" in res[0].stderr


# -- stops, finish reasons and log-probabilities --------------------------------------------------

def merges_tokenizer():
    """The byte-level tokenizer plus merges of common letter pairs: tokens of two or more
    characters, so that a stop string can end inside a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from pipeinfer.models.tiny import SPECIALS as DEMO_SPECIALS

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in DEMO_SPECIALS:
        vocab[t] = len(vocab)
    merges = []
    for a in "etaoinshrd":
        for b in "etaoinshrdĠ":
            if len(vocab) < VOCAB:
                merges.append((a, b))
                vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(DEMO_SPECIALS))
    # model_input_names: transformers 4.57's PreTrainedTokenizerFast would add token_type_ids, which
    # generate() refuses
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   padding_side="left", model_input_names=["input_ids", "attention_mask"])


# Chosen for what the random model (seed 3) does greedily after them: see stop_case.
STOP_PROMPTS = ["a", "The quick brown fox jumps over", "Hello", "dear diary"]


def reference_with_stops(model: str, prompts: list[str], max_new: int, eos: int, stops: list[tuple]) -> list:
    """generate() per prompt with its stop strings (tokenizer=...) and stop ids as extra EOS ids:
    (ids, finish_reason, scores) as the runner must record them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(model, local_files_only=True, dtype=torch.float32).eval()
    out = []
    for p, (strings, ids) in zip(prompts, stops):
        enc = tok(p, return_tensors="pt")
        kw = dict(stop_strings=list(strings), tokenizer=tok) if strings else {}
        with torch.no_grad():
            g = lm.generate(**enc, do_sample=False, max_new_tokens=max_new, pad_token_id=tok.pad_token_id,
                            eos_token_id=[eos, *ids], output_scores=True, output_logits=True,
                            return_dict_in_generate=True, **kw)
        new = g.sequences[0, enc["input_ids"].shape[1]:].tolist()
        chosen = lm.compute_transition_scores(g.sequences, g.scores, normalize_logits=True)[0].tolist()
        logsm = [torch.log_softmax(x[0].float(), -1) for x in g.logits]
        reason = "eos" if new[-1] == eos else ("stop" if len(new) < max_new else "length")
        out.append((new, reason, chosen, logsm))
    return out


@pytest.fixture(scope="module")
def stop_case(chat_weights, tmp_path_factory):
    """A model with a merges tokenizer and an EOS, and per-prompt stops under which, greedily, one
    prompt ends at EOS, one at a stop string that spans two tokens and ends inside the second, one
    at a stop token id and one at max_new_tokens. Found by search on generate()'s own outputs."""
    path = with_tokenizer(chat_weights, str(tmp_path_factory.mktemp("models") / "merges"), merges_tokenizer())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = generate_from_ids(path, [tok(p)["input_ids"] for p in STOP_PROMPTS], 12)
    text = [[tok.decode([t]) for t in row] for row in base]
    # prompt 1: a stop string made of the end of one token and the start of the next, longer one
    p1 = next(p for p in range(1, 10) if len(text[1][p]) >= 2 and text[1][p - 1][-1:].isascii()
              and text[1][p - 1][-1:].strip() and text[1][p].isascii())
    stop_str = text[1][p1 - 1][-1] + text[1][p1][0]
    stop_id = base[2][4]   # prompt 2: a stop token id
    eos = next(t for t in base[0][2:9] if t not in base[3] and t != stop_id and t not in base[1][:p1 + 1]
               and t not in base[2][:5])  # prompt 0: EOS, which prompt 3 never emits
    set_eos_token(path, eos)
    run_stop = [stop_str]
    stops = [(tuple(run_stop), ()), (tuple(run_stop), ()), ((), (stop_id,)), ((), ())]
    return path, eos, stop_str, stop_id, stops, reference_with_stops(path, STOP_PROMPTS, 12, eos, stops)


@pytest.mark.parametrize("pipeline_size,chunk", [(1, 512), (2, 512), (3, 512), (1, 3), (2, 3)])
def test_stops_finish_reasons_and_logprobs_match_generate(stop_case, tmp_path, pipeline_size, chunk):
    """chunk: prefill_chunk_size (3: the prompts prefill 3 positions per visit, then join)."""
    path, eos, stop_str, stop_id, stops, ref = stop_case
    assert [r[1] for r in ref] == ["eos", "stop", "stop", "length"], "the search must give all three reasons"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ends_in = tok.decode(ref[1][0][-1:])
    assert len(ends_in) >= 2 and stop_str not in ends_in, "the stop string must span two tokens, ending inside one"
    pfile = tmp_path / "p.jsonl"
    rows = [{"prompt": STOP_PROMPTS[0]}, {"prompt": STOP_PROMPTS[1]},
            {"prompt": STOP_PROMPTS[2], "stop": [], "stop_token_ids": [stop_id]},
            {"prompt": STOP_PROMPTS[3], "stop": []}]  # an empty list overrides the run's stop
    pfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    k = 3
    cfg = base_config(path, tmp_path, prompts=None, prompts_file=str(pfile), pipeline_size=pipeline_size,
                      batch_size=4, micro_batch_size=4, stop=[stop_str], logprobs=k, prefill_chunk_size=chunk)
    out = run_pipeline(cfg, tmp_path, pipeline_size)
    records = prompt_records(out)
    assert all((s["prefill_chunks"] > 0) == (chunk == 3) for s in out if s["type"] == "stage")
    assert [r["output_ids"] for r in records] == [r[0] for r in ref]
    assert [r["finish_reason"] for r in records] == ["eos", "stop", "stop", "length"]
    assert [r["stop_reason"] for r in records] == [None, stop_str, stop_id, None]
    for rec, (ids, _, chosen, logsm) in zip(records, ref):
        assert [e["id"] for e in rec["logprobs"]] == ids
        assert [e["logprob"] for e in rec["logprobs"]] == pytest.approx(chosen, abs=1e-5)
        for e, lsm in zip(rec["logprobs"], logsm):
            top = torch.topk(lsm, k)
            assert [t["id"] for t in e["top"]] == top.indices.tolist()
            assert [t["logprob"] for t in e["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)
    # the string ends inside a token: the last token's text goes past the stop string
    last_text = records[1]["output_text"]
    assert stop_str in last_text and not last_text.endswith(stop_str)



@pytest.mark.parametrize("pipeline_size", [1, 2])
def test_stop_strings_match_in_the_generated_text_only(chat_weights, tmp_path, pipeline_size):
    """A stop string that begins in the prompt and ends in the first new token does not stop (vLLM's
    and OpenAI's stops, whose names the records use), where generate(stop_strings=...) stops at
    once; a stop inside the new text stops where it is completed. A plain prompt, and a ChatML one
    whose template ends in "assistant\n". Expected: generate()'s tokens without stops, cut where
    a stop first appears in their text."""
    from transformers import AutoTokenizer

    path = with_tokenizer(chat_weights, str(tmp_path / "chatml"), chat_tokenizer("chatml"))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    messages = CHATS[0]
    inputs = [tok("Hello")["input_ids"], template_ids(path, messages)]
    base = generate_from_ids(path, inputs, 12)
    stops = []
    for ids, out in zip(inputs, base):
        first, tail = tok.decode(out[:1]), tok.decode(ids)[-1]
        assert len(first) == 1 and first.isascii(), f"the model's first token must be one character: {first!r}"
        p = next(p for p in range(1, 12) if tok.decode(out[p - 1:p + 1]).isprintable())
        stops.append([tail + first, tok.decode(out[p - 1:p + 1])])  # across the boundary; in the new text
        straddling = generate_from_ids(path, [ids], 12, stop_strings=stops[-1][:1], tokenizer=tok)[0]
        assert straddling == out[:1], "generate() matches the prompt's last character with the first token's"
    want = []
    for out, st in zip(base, stops):
        n = next(n for n in range(1, 13) if any(s in tok.decode(out[:n]) for s in st))
        want.append((out[:n], next(s for s in st if s in tok.decode(out[:n]))))
    assert stops[1][0].startswith("\n"), "the ChatML template ends in a newline"
    pfile = tmp_path / "p.jsonl"
    pfile.write_text(json.dumps({"prompt": "Hello", "stop": stops[0]}) + "\n"
                     + json.dumps({"messages": messages, "stop": stops[1]}) + "\n")
    cfg = base_config(path, tmp_path, prompts=None, prompts_file=str(pfile), pipeline_size=pipeline_size,
                      batch_size=2, micro_batch_size=2)
    records = prompt_records(run_pipeline(cfg, tmp_path, pipeline_size))
    assert [(r["output_ids"], r["stop_reason"]) for r in records] == want
    assert [r["finish_reason"] for r in records] == ["stop", "stop"]
    assert all(len(r["output_ids"]) > 1 for r in records)


def test_a_line_replaces_only_the_stops_it_gives(stop_case, tmp_path):
    """A .jsonl line's "stop" replaces the run's stop strings only, its "stop_token_ids" the run's
    ids only: a run-level end-of-turn id survives a line that adds stop strings, and the run's stop
    strings a line that gives ids. Each record is generate()'s with the stops that result."""
    path, eos, stop_str, stop_id, _, case_ref = stop_case
    other_id = next(t for t in range(3, 200) if t not in (eos, stop_id, *case_ref[1][0]))  # never emitted there
    rows = [{"prompt": STOP_PROMPTS[2], "stop": ["QQ"]},            # keeps the run's stop_token_ids
            {"prompt": STOP_PROMPTS[1], "stop_token_ids": [other_id]}]  # keeps the run's stop strings
    pfile = tmp_path / "p.jsonl"
    pfile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base_config(path, tmp_path, prompts=None, prompts_file=str(pfile), batch_size=2, stop=[stop_str],
                      stop_token_ids=[stop_id])
    records = prompt_records(run_pipeline(cfg, tmp_path, 1))
    ref = reference_with_stops(path, [STOP_PROMPTS[2], STOP_PROMPTS[1]], 12, eos,
                               [(("QQ",), (stop_id,)), ((stop_str,), (other_id,))])
    assert [r["output_ids"] for r in records] == [r[0] for r in ref]
    assert [(r["finish_reason"], r["stop_reason"]) for r in records] == [("stop", stop_id), ("stop", stop_str)]



def test_resume_refuses_records_made_under_a_lines_old_settings(stop_case, tmp_path):
    """A record is made by the rendered prompt and the line's own settings: a rerun after editing
    only a line's "stop" refuses the resume with one line naming the prompt, the line and what
    changed (the records made under the old stop are not what the line now asks for); an unchanged
    file resumes with nothing to do, and resume=false then gives generate()'s outputs under the
    new stop."""
    path, eos, stop_str, stop_id, _, _ = stop_case
    pfile = tmp_path / "p.jsonl"

    def write(stop):
        rows = [{"prompt": STOP_PROMPTS[0]}, {"prompt": STOP_PROMPTS[1], "stop": stop}]
        pfile.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write(["zz"])
    cfg = base_config(path, tmp_path, prompts=None, prompts_file=str(pfile), batch_size=2)
    first = prompt_records(run_pipeline(cfg, tmp_path, 1))
    assert len(prompt_records(run_pipeline(cfg, tmp_path, 1))) == 2  # unchanged: resumed, nothing appended
    write([stop_str])
    res = launch(cfg, tmp_path, 1)
    lines = res[0].stderr.strip().splitlines()
    assert res[0].returncode == 2 and lines[-1].startswith("error: "), res[0].stderr
    assert "prompt_index=1" in lines[-1] and "line 2" in lines[-1] and stop_str in lines[-1], lines[-1]
    assert "resume=false" in lines[-1], lines[-1]
    again = prompt_records(run_pipeline(dict(cfg, resume=False), tmp_path, 1))
    ref = reference_with_stops(path, STOP_PROMPTS[:2], 12, eos, [((), ()), ((stop_str,), ())])
    assert [r["output_ids"] for r in again] == [r[0] for r in ref]
    assert again[1]["output_ids"] != first[1]["output_ids"]  # the old record was not what the line asks now


# -- prompt log-probabilities and the scoring mode ------------------------------------------------

@pytest.mark.parametrize("pipeline_size", [2, 3])
def test_prompt_logprobs_and_scoring_match_one_forward(tiny_llama, tmp_path, pipeline_size):
    """max_new_tokens=0 with prompt_logprobs: each prompt token's log-probability equals
    log_softmax of one whole-model forward, for prompts longer than the chunk (and padded in one
    micro-batch with a short one); sum, count and perplexity follow from them."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = ["The quick brown fox jumps over the lazy dog", "a b", "Pipeline parallel inference, token for token."]
    cfg = base_config(tiny_llama, tmp_path, prompts=prompts, pipeline_size=pipeline_size, batch_size=3,
                      micro_batch_size=3, max_new_tokens=0, prompt_logprobs=True, prompt_logprobs_chunk=7)
    records = prompt_records(run_pipeline(cfg, tmp_path, pipeline_size))
    tok = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True, dtype=torch.float32).eval()
    for rec, p in zip(records, prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lsm = torch.log_softmax(lm(ids).logits[0].float(), -1)  # (T, V)
        want = lsm[:-1].gather(-1, ids[0, 1:, None])[:, 0].tolist()
        assert rec["prompt_logprobs"][0] is None and rec["prompt_logprobs"][1:] == pytest.approx(want, abs=1e-5)
        assert rec["prompt_logprob_count"] == len(want) == ids.shape[1] - 1
        assert rec["prompt_logprob_sum"] == pytest.approx(sum(want), abs=1e-4)
        assert rec["perplexity"] == pytest.approx(math.exp(-sum(want) / len(want)), rel=1e-5)
        assert rec["output_ids"] == [] and rec["new_tokens"] == 0
    assert max(r["prompt_tokens"] for r in records) > 7 * 3, "prompts must span several chunks"


def test_prompt_logprobs_beside_generation(tiny_llama, tmp_path):
    """prompt_logprobs with generation: the same tokens as generate(), and the scores as well."""
    from conftest import PROMPTS, reference_outputs

    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, batch_size=2, prompt_logprobs=True,
                      prompt_logprobs_chunk=4, logprobs=1)
    records = prompt_records(run_pipeline(cfg, tmp_path, 2))
    assert [r["output_ids"] for r in records] == reference_outputs(tiny_llama, PROMPTS, 12)
    assert [r["prompt_logprob_count"] for r in records] == [r["prompt_tokens"] - 1 for r in records]
    assert all(len(r["logprobs"]) == len(r["output_ids"]) for r in records)



def test_one_token_prompts_with_prompt_logprobs(tiny_llama, tmp_path):
    """A micro-batch of one-token prompts has no prompt log-probabilities to send (T - 1 = 0): every
    later message still reads as sent (it was read one off: garbage in a later record, then a hang
    or a gloo abort), and the scores match one whole-model forward."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import reference_outputs

    prompts = ["Hello", "a", "Hello there", "b", "The quick brown fox"]  # batch_size 2, two stages: one per slot
    cfg = base_config(tiny_llama, tmp_path, prompts=prompts, pipeline_size=2, max_new_tokens=0, prompt_logprobs=True,
                      timeout_s=30)
    records = prompt_records(run_pipeline(cfg, tmp_path, 2, timeout=120))
    tok = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True, dtype=torch.float32).eval()
    assert [r["prompt_tokens"] for r in records] == [len(tok(p)["input_ids"]) for p in prompts]
    assert records[1]["prompt_tokens"] == records[3]["prompt_tokens"] == 1
    for rec, p in zip(records, prompts):
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lsm = torch.log_softmax(lm(ids).logits[0].float(), -1)  # (T, V)
        want = lsm[:-1].gather(-1, ids[0, 1:, None])[:, 0].tolist()
        assert rec["prompt_logprobs"][1:] == pytest.approx(want, abs=1e-5)
        assert rec["prompt_logprob_count"] == len(want)
        if want:
            assert rec["prompt_logprob_sum"] == pytest.approx(sum(want), abs=1e-4)
            assert rec["perplexity"] == pytest.approx(math.exp(-sum(want) / len(want)), rel=1e-5)
    # one one-token prompt, generating: its tokens arrive (the first rank died reading them one off)
    cfg = base_config(tiny_llama, tmp_path, prompts=["a"], pipeline_size=2, max_new_tokens=3, prompt_logprobs=True,
                      timeout_s=30, output_path=str(tmp_path / "gen.jsonl"))
    (rec,) = prompt_records(run_pipeline(cfg, tmp_path, 2, timeout=120))
    assert rec["output_ids"] == reference_outputs(tiny_llama, ["a"], 3)[0]
    assert rec["prompt_logprob_count"] == 0

# -- bad input: one line, exit 2, before any rank waits -------------------------------------------

USER = [{"role": "user", "content": "hi"}]
BAD_INPUT = [
    ("message without a role", {"prompts": [[{"content": "hi"}]]}, 'message 0 "role" is missing'),
    ("message without content", {"prompts": [[{"role": "user"}]]}, 'message 0 "content" is missing'),
    ("message not an object", {"prompts": [["hi"]]}, "message 0 is str, not an object"),
    ("no chat template", {"prompts": [USER]}, "has no chat template: set chat_template"),
    ("template file missing", {"prompts": [USER], "chat_template": "/nonexistent.jinja"}, "cannot be read"),
    ("template that does not render", {"prompts": [USER], "chat_template": "BAD"}, "does not render"),
    ("template with a syntax error", {"prompts": [USER], "chat_template": "SYNTAX"}, "does not render"),
    ("stop not a list", {"stop": "\n"}, "stop=\"\\n\" has the wrong type"),
    ("stop of numbers", {"stop": [1]}, "stop=[1] is out of range"),
    ("stop_token_ids of strings", {"stop_token_ids": ["2"]}, "stop_token_ids"),
    ("stop_token_ids beyond the tokenizer", {"stop_token_ids": [5000]}, "stop_token_ids [5000] are not among"),
    ("logprobs beyond the vocabulary", {"logprobs": 100000}, "logprobs=100000 > the vocabulary's 259 tokens"),
    ("scoring without prompt_logprobs", {"max_new_tokens": 0}, "set prompt_logprobs=true"),
    ("per-prompt stop of the wrong type", {"prompts": None, "prompts_file": "STOPFILE"},
     "line 1: stop=\"x\" has the wrong type"),
    ("a line with prompt and messages", {"prompts": None, "prompts_file": "BOTHFILE"},
     'either a "prompt" string or a "messages" list'),
]


@pytest.mark.parametrize("name,over,needle", BAD_INPUT, ids=[b[0] for b in BAD_INPUT])
def test_bad_instruct_input_exits_2_with_one_line(tiny_llama, tmp_path, name, over, needle):
    """Every rank of a 2-rank job refuses alone, before it waits on another (the cases alternate
    between rank 0 and rank 1, to keep process starts few)."""

    from conftest import rank_env, run_rank

    files = {"BAD": "{{ raise_exception('no system messages here') }}", "SYNTAX": "{% for m in %}",
             "STOPFILE": json.dumps({"prompt": "a", "stop": "x"}) + "\n",
             "BOTHFILE": json.dumps({"prompt": "a", "messages": USER}) + "\n"}
    over = dict(over)
    for key, value in over.items():
        if isinstance(value, str) and value in files:
            path = tmp_path / (value + (".jsonl" if value.endswith("FILE") else ".jinja"))
            path.write_text(files[value])
            over[key] = str(path)
    cfg = base_config(tiny_llama, tmp_path, **over)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    # port 1: nothing may connect anywhere before the checks pass
    rank = [b[0] for b in BAD_INPUT].index(name) % 2
    res = run_rank(["--config", str(tmp_path / "cfg.json"), "--set", "pipeline_size=2"], rank_env(rank, 2, 1),
                   timeout=60)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "out.jsonl").exists()


def test_scoring_holds_at_most_a_chunk_of_logits():
    """scoring.prompt_logprobs never asks the lm_head for more than (B, chunk) positions, and its
    values equal log_softmax over the whole (B, T, V) logits at once."""
    from pipeinfer.run.scoring import greedy_row, prompt_logprobs

    torch.manual_seed(0)
    B, T, H, V, chunk = 2, 23, 8, 50, 5
    head = torch.nn.Linear(H, V, bias=False)
    shapes = []
    head.register_forward_hook(lambda mod, args, out: shapes.append(tuple(out.shape)))
    hidden, ids = torch.randn(B, T, H), torch.randint(0, V, (B, T))
    last, got = prompt_logprobs(head, hidden, ids, chunk)
    assert max(s[1] for s in shapes[:-1]) == chunk and len(shapes) == -(-(T - 1) // chunk) + 1
    with torch.no_grad():
        whole = torch.log_softmax(head(hidden).float(), -1)  # (B, T, V)
    assert torch.allclose(got[:, 0], whole[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].double(), atol=1e-6)
    top = whole[:, :-1].max(-1)  # each position's argmax (id and log-probability): what greedy_row compares
    assert torch.equal(got[:, 1], top.indices.double())  # (a chunk's log_softmax rounds as the whole one may not)
    assert torch.allclose(got[:, 2], top.values.double(), atol=1e-6)
    assert greedy_row(got[0, 1].long().tolist(), ids[0].tolist(), None) == (top.indices[0] == ids[0, 1:]).tolist()
    assert torch.allclose(last, head(hidden[:, -1]).float())
    nxt = torch.randint(0, V, (B,))  # the token after each row (Prompt.score_next): scored from the last position
    _, with_next = prompt_logprobs(head, hidden, ids, chunk, nxt)
    assert torch.equal(with_next[:, 1, :T - 1], got[:, 1])  # the argmax ids; values as rounded per chunk shape
    assert torch.allclose(with_next[:, ::2, :T - 1], got[:, ::2], atol=1e-6)
    want = torch.log_softmax(head(hidden[:, -1]).float(), -1).gather(-1, nxt[:, None])[:, 0].double()
    assert torch.allclose(with_next[:, 0, T - 1], want, atol=1e-6)


def test_sampled_logprobs_are_those_of_the_filtered_scores(tiny_llama, tmp_path):
    """With sampling, each chosen token's log-probability is that of the scores it was drawn from:
    whole-model logits through transformers' own temperature, top-k and top-p warpers, as the
    scores generate(do_sample=True) returns (what compute_transition_scores normalizes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    prompts = ["Hello", "The quick brown fox jumps over"]
    cfg = base_config(tiny_llama, tmp_path, prompts=prompts, pipeline_size=2, batch_size=2, max_new_tokens=6,
                      do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=7, logprobs=2)
    records = prompt_records(run_pipeline(cfg, tmp_path, 2))
    tok = AutoTokenizer.from_pretrained(tiny_llama, local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(tiny_llama, local_files_only=True, dtype=torch.float32).eval()
    warp = LogitsProcessorList([TemperatureLogitsWarper(0.8), TopKLogitsWarper(20), TopPLogitsWarper(0.9)])
    for rec, p in zip(records, prompts):
        prompt = tok(p)["input_ids"]
        seq = torch.tensor([prompt + rec["output_ids"]])
        with torch.no_grad():
            logits = lm(seq).logits[0].float()  # (T + n, V)
        for j, entry in enumerate(rec["logprobs"]):
            pos = len(prompt) - 1 + j
            lsm = torch.log_softmax(warp(seq[:, :pos + 1], logits[pos][None].clone())[0], -1)
            assert entry["logprob"] == pytest.approx(lsm[rec["output_ids"][j]].item(), abs=1e-5)
            assert [t["id"] for t in entry["top"]] == torch.topk(lsm, 2).indices.tolist()


PEAK_SCRIPT = """
import resource, sys, torch
from pipeinfer.run.scoring import prompt_logprobs
torch.manual_seed(0)
H, V, T = 64, 32000, 2048
head = torch.nn.Linear(H, V, bias=False)
hidden, ids = torch.randn(1, T, H), torch.randint(0, V, (1, T))
with torch.inference_mode():
    prompt_logprobs(head, hidden, ids, 16)  # allocator warm-up at a small chunk
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prompt_logprobs(head, hidden, ids, int(sys.argv[1]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def test_scoring_peak_memory_follows_the_chunk():
    """Measured, in a fresh process: scoring a 2048-token prompt over a 32000-token vocabulary
    raises the peak resident set by about a chunk's logits, not by the whole prompt's
    (2048 x 32000 float32 = 262 MB), which the same code without chunking (chunk = T) does."""
    import subprocess
    import sys

    from conftest import ROOT

    def peak_growth(chunk: int) -> int:
        done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(chunk)], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT))
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    whole = 2048 * 32000 * 4
    chunked, unchunked = peak_growth(64), peak_growth(2048)
    assert chunked < whole / 8, (chunked, unchunked)  # a 64-position chunk is 8 MB of logits
    assert unchunked > whole / 2, (chunked, unchunked)  # the measure sees the whole-prompt logits
