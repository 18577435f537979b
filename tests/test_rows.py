"""Row-level refill (schedule "rows", run/rows.py): a finished prompt frees its row at once and the
next prompt takes it. Greedy ids equal whole-model generate() per prompt with very different
prompt lengths and per-prompt max_new_tokens, rows joining and leaving many times; never more than
batch_size prompts in flight (from the records' times); a header that disagrees with a stage's own
state ends every rank with one line.

    pytest tests/test_rows.py
"""

from __future__ import annotations

import json
import textwrap

import pytest

from conftest import ENTRY, PROMPTS, base_config, free_port, rank_env, reference_outputs, run_pipeline, start_rank

TEXTS = PROMPTS + ["x", "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt",
                   "ab", "Hi there", "Z", "A longer prompt than most, but not the longest one here.", "ok", "0 1 2 3"]
MAX_NEW = [9, 2, 5, 1, 12, 3, 6, 4, 7, 1, 2, 15]


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return [reference_outputs(tiny_llama, [p], n)[0] for p, n in zip(TEXTS, MAX_NEW)]


def _jsonl(tmp_path) -> str:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": n}) + "\n" for p, n in zip(TEXTS, MAX_NEW)))
    return str(path)


def max_overlap(prompts: list[dict]) -> int:
    """The most prompts whose [start, last token] intervals overlap at once."""
    events = sorted([(p["start_s"], 1) for p in prompts] + [(p["start_s"] + p["latency_s"], -1) for p in prompts],
                    key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


@pytest.mark.parametrize("pipeline_size,batch_size", [(1, 1), (1, 3), (1, 8), (2, 1), (2, 3), (2, 8), (3, 1), (3, 3),
                                                      (3, 8)])
def test_rows_match_generate(tiny_llama, reference, tmp_path, pipeline_size, batch_size):
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=pipeline_size, batch_size=batch_size, schedule="rows")
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == reference
    assert [len(r) for r in reference] == MAX_NEW, "the tiny model should not hit EOS here"
    stages = [r for r in records if r["type"] == "stage"]
    assert all(s["schedule"] == "rows" for s in stages)
    assert all(0 < s["max_prompts_in_flight"] <= batch_size for s in stages)
    assert max_overlap(prompts) <= batch_size
    # rows joined and left many times: every prompt started on its own, more starts than rows
    assert len({p["start_s"] for p in prompts}) == len(TEXTS) > batch_size
    # every stage ran each prompt's positions once, plus the decode rows of its slot
    assert all(s["rows_computed"] >= sum(p["prompt_tokens"] + p["new_tokens"] - 1 for p in prompts) for s in stages)
    # joiners' prefills ran in their visit's decode forward (load/packed.py), the same visits on every stage
    assert stages[0]["packed_visits"] > 0 and len({s["packed_visits"] for s in stages}) == 1, stages


@pytest.mark.parametrize("pipeline_size", [1, 2])
def test_a_slots_cache_stays_within_the_planned_capacity(tiny_llama, tmp_path, pipeline_size):
    """One row per slot: a prompt that ends early, then one that runs its whole max_new_tokens in
    the same row. The slot's positions never pass the plan's capacity (longest prompt +
    max_new_tokens): what no live row attends to is dropped first, where growing would double the
    planned KV cache. The tokens still equal generate()'s."""
    texts, new = ["Hi", "x", "ab"], [6, 40, 40]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": n}) + "\n" for p, n in zip(texts, new)))
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=str(path), max_new_tokens=40,
                      pipeline_size=pipeline_size, batch_size=pipeline_size, schedule="rows")
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == [reference_outputs(tiny_llama, [p], n)[0] for p, n in zip(texts, new)]
    capacity = next(r for r in records if r["type"] == "run")["plan"]["capacity"]
    stages = [r for r in records if r["type"] == "stage"]
    assert all(0 < s["kv_positions_max"] <= capacity for s in stages), ([s["kv_positions_max"] for s in stages],
                                                                        capacity)


def test_rows_waste_fewer_rows_than_micro_batches(tiny_llama, tmp_path):
    """The same long-tailed workload: the rows schedule computes fewer positions per useful token."""
    out = {}
    for schedule in ("rows", "micro_batches"):
        cfg = base_config(tiny_llama, tmp_path / schedule, prompts=None, prompts_file=_jsonl(tmp_path),
                          max_new_tokens=4, pipeline_size=1, batch_size=4, micro_batch_size=4, schedule=schedule)
        records = run_pipeline(cfg, tmp_path, 1)
        useful = sum(r["new_tokens"] for r in records if r["type"] == "prompt")
        out[schedule] = next(r for r in records if r["type"] == "stage")["rows_computed"] / useful
        assert [r["output_ids"] for r in sorted((r for r in records if r["type"] == "prompt"),
                                                key=lambda r: r["prompt_index"])] == \
            [reference_outputs(tiny_llama, [p], n)[0] for p, n in zip(TEXTS, MAX_NEW)]
    assert out["rows"] < out["micro_batches"], out


@pytest.mark.parametrize("pipeline_size,batch_size", [(1, 1), (1, 3), (1, 8), (2, 1), (2, 3), (2, 8), (3, 1), (3, 3),
                                                      (3, 8)])
def test_chunked_prefill_matches_generate(tiny_llama, reference, tmp_path, pipeline_size, batch_size):
    """prefill_chunk_size 5: every prompt longer than 5 tokens prefills in chunks, at most 5 positions
    a visit of its slot for all of its prompts under way, the oldest first, beside the other rows'
    decode steps, then joins as a row. The tokens equal generate()'s; every stage ran the chunks; prompts in
    flight (their prefill included) never pass batch_size."""
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=pipeline_size, batch_size=batch_size, schedule="rows", prefill_chunk_size=5)
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == reference
    stages = [r for r in records if r["type"] == "stage"]
    # at most 5 positions of chunks a visit: a prompt of n > 5 tokens takes ceil(n / 5) chunks or more
    chunks = sum(-(-p["prompt_tokens"] // 5) for p in prompts if p["prompt_tokens"] > 5)
    assert chunks > len(TEXTS) and stages[0]["prefill_chunks"] >= chunks, stages
    assert len({s["prefill_chunks"] for s in stages}) == 1, stages
    assert stages[0]["packed_visits"] > 0 and len({s["packed_visits"] for s in stages}) == 1, stages
    assert all(0 < s["max_prompts_in_flight"] <= batch_size for s in stages)
    assert max_overlap(prompts) <= batch_size


@pytest.mark.parametrize("pipeline_size,batch_size,chunk", [(1, 3, 0), (2, 3, 0), (2, 8, 5), (3, 3, 5)])
def test_separate_prefill_matches_generate(tiny_llama, reference, tmp_path, pipeline_size, batch_size, chunk):
    """packed_prefill false: a visit's prefills run as forwards of their own beside its decode (the
    whole joiners left-padded among themselves); the same tokens as generate()."""
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=pipeline_size, batch_size=batch_size, prefill_chunk_size=chunk,
                      packed_prefill=False)
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == reference
    stages = [r for r in records if r["type"] == "stage"]
    assert all(s["packed_visits"] == 0 and s["schedule"] == "rows" for s in stages), stages
    assert all((s["prefill_chunks"] > 0) == (chunk > 0) for s in stages), stages


@pytest.mark.parametrize("pipeline_size", [2, 3])
def test_unspread_prefill_matches_generate(tiny_llama, reference, tmp_path, pipeline_size):
    """spread_prefill false: every prompt up to prefill_chunk_size prefills whole in the visit that
    admits it (no chunks: these prompts are all shorter than 512); the same tokens as generate()."""
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=pipeline_size, batch_size=3, spread_prefill=False)
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == reference
    stages = [r for r in records if r["type"] == "stage"]
    assert all(s["prefill_chunks"] == 0 < s["packed_visits"] for s in stages), stages


_WRAPPER = """import json, os, runpy, sys
from pipeinfer.run import rows

if os.environ["RANK"] == "0":
    real, seen = rows.RowSchedule._header, []

    def edited(self, *a):
        head = real(self, *a)
BODY
        return head
    rows.RowSchedule._header = edited
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def header_edit(body: str) -> str:
    """A script that runs the entry script given after it, where the first stage's every visit
    header goes through `body` (statements on `head`, with `seen`, a list kept across visits)."""
    return _WRAPPER.replace("BODY", textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 8))


def _seen_run(cfg: dict, tmp_path, wrapper: str) -> tuple[list[dict], list[dict]]:
    """Run 2 ranks through `wrapper`, which writes what it sees as JSON lines to $SEEN_FILE; both must
    exit 0. Returns those lines and the run's records."""
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "seen.py").write_text(wrapper)
    port = free_port()
    ranks = [start_rank([str(tmp_path / "seen.py"), ENTRY, "--config", str(tmp_path / "cfg.json")],
                        dict(rank_env(r, 2, port), SEEN_FILE=str(tmp_path / "seen.jsonl"))) for r in range(2)]
    try:
        outs = [r.communicate(timeout=120) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    assert [r.returncode for r in ranks] == [0, 0], [e[-1500:] for _, e in outs]
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    return seen, [json.loads(line) for line in open(cfg["output_path"], encoding="utf-8")]


def _wrapped_ranks_fail_with_one_line(cfg: dict, tmp_path, wrapper: str, pipeline_size: int) -> list[str]:
    """Run every rank through `wrapper` (which edits the first stage's headers); each must exit 1
    with one error line and no traceback. Returns each rank's stderr."""
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "wrong.py").write_text(wrapper)
    port = free_port()
    ranks = [start_rank([str(tmp_path / "wrong.py"), ENTRY, "--config", str(tmp_path / "cfg.json")],
                        rank_env(r, pipeline_size, port)) for r in range(pipeline_size)]
    try:
        outs = [r.communicate(timeout=120) for r in ranks]
    finally:
        for r in ranks:
            r.kill()
    assert [r.returncode for r in ranks] == [1] * pipeline_size, [e[-1500:] for _, e in outs]
    for _, err in outs:
        errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err[-1500:]
    return [err for _, err in outs]


CHUNK_DISAGREE = header_edit('''
    if any(c["start"] for c in head["chunks"]) and not seen:  # a prompt's second chunk, from the wrong place
        seen.append(1)
        next(c for c in head["chunks"] if c["start"])["start"] += 1
''')


def test_a_chunk_the_stages_disagree_on_is_one_line_on_every_rank(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=2, batch_size=3, schedule="rows", prefill_chunk_size=5, timeout_s=90)
    errs = _wrapped_ranks_fail_with_one_line(cfg, tmp_path, CHUNK_DISAGREE, 2)
    assert "pipeline protocol error: the first stage's header says prefill chunks" in errs[1]


DISAGREE = header_edit('''
    seen.append(1)
    if len(seen) == 4:  # a wrong cache length at the 4th visit
        head["L"] += 1
''')


PACKED_DISAGREE = header_edit('''
    if head["join"] and not seen:  # the first visit with joiners says their prefill runs apart
        seen.append(1)
        head["packed"] = False
''')


def test_a_packed_prefill_the_stages_disagree_on_is_one_line_on_every_rank(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=2, batch_size=3, schedule="rows", timeout_s=90)
    errs = _wrapped_ranks_fail_with_one_line(cfg, tmp_path, PACKED_DISAGREE, 2)
    assert "pipeline protocol error: the first stage's header says a separate prefill (this stage's would be " \
           "packed)" in errs[1]


@pytest.mark.parametrize("pipeline_size", [2, 3])
def test_header_disagreement_is_one_line_on_every_rank(tiny_llama, tmp_path, pipeline_size):
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=pipeline_size, batch_size=3, schedule="rows", timeout_s=90)
    errs = _wrapped_ranks_fail_with_one_line(cfg, tmp_path, DISAGREE, pipeline_size)
    assert "pipeline protocol error: the first stage's header says cache length" in errs[1]


HEADERS_SEEN = header_edit('''
    with open(os.environ["SEEN_FILE"], "a") as f:  # every visit header, to a file
        f.write(json.dumps(head) + "\\n")
''')


def test_prefills_spread_over_both_slots_and_join_the_slot_of_their_last_part(tiny_llama, reference, tmp_path):
    """Pipeline_size 2, batch 4 (slots of 2): a visit runs no more prompt positions than the visit
    before it or half of those due, so a joiner's prefill that would make its visit the longer one
    runs in part in the other slot's next visit, whose slot it joins; where that slot is full, as
    many of its rows move to the admitting slot (while prompts still wait in the queue). The tokens
    equal generate()'s; every stage ran each prompt's positions once; never more than 4 prompts in
    flight."""
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_jsonl(tmp_path), max_new_tokens=4,
                      pipeline_size=2, batch_size=4, schedule="rows")
    heads, records = _seen_run(cfg, tmp_path, HEADERS_SEEN)
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == reference
    parts: dict[int, list[tuple[int, int]]] = {}  # prompt -> (slot, positions) of each part that ran
    last = 0
    for h in heads:
        ran, due = sum(len(c["ids"]) for c in h["chunks"]), sum(c["n"] - c["start"] for c in h["chunks"])
        assert ran <= max(last, -(-due // 2)), h
        last = ran
        for c in h["chunks"]:
            if c["ids"]:
                parts.setdefault(c["index"], []).append((h["slot"], len(c["ids"])))
        for j in h["join"]:  # a prompt joins the slot of its last part
            assert j.get("chunked") and parts[j["index"]][-1][0] == h["slot"], h
    assert sorted(parts) == list(range(len(TEXTS)))
    assert all(sum(n for _, n in parts[i]) == p["prompt_tokens"] for i, p in enumerate(prompts))
    assert any(len({slot for slot, _ in ps}) == 2 for ps in parts.values()), parts
    # rows moved to make room for a last part while later prompts had yet to start
    admitted = [i for i, h in enumerate(heads) for c in h["chunks"] if c["start"] == 0 and c["ids"]]
    assert any(h["move"] and i < admitted[-1] for i, h in enumerate(heads)), heads
    stages = [r for r in records if r["type"] == "stage"]
    useful = sum(p["prompt_tokens"] + p["new_tokens"] - 1 for p in prompts)
    assert [s["rows_computed"] for s in stages] == [useful] * 2
    assert [s["rows_moved"] for s in stages] == [sum(len(h["move"]["rows"]) for h in heads if h["move"])] * 2
    assert all(0 < s["max_prompts_in_flight"] <= 4 for s in stages) and max_overlap(prompts) <= 4


# Equal prompt lengths (byte tokenizer: no padding among joiners), so a stage's positions are known
# exactly. Batch 4 at pipeline_size 2: slots of 2 rows; the short prompts of slot 1 end and the
# queue runs dry while slot 0 still holds two long rows, one of which moves to the emptied slot.
EVEN_TEXTS = ["abcdef", "ghijkl", "mnopqr", "stuvwx", "yz0123", "456789"]
EVEN_NEW = [18, 15, 3, 3, 5, 2]


def _even(tmp_path) -> str:
    path = tmp_path / "even.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": n}) + "\n" for p, n in zip(EVEN_TEXTS, EVEN_NEW)))
    return str(path)


@pytest.mark.parametrize("pipeline_size", [1, 2])
def test_only_live_rows_are_computed_and_rows_move_to_an_empty_slot(tiny_llama, tmp_path, pipeline_size):
    """Every stage computes each prompt's own positions once and one decode row per token after
    the first, nothing for finished or free rows; at pipeline_size 2, once the queue is dry, rows
    of the slot still running move to the emptied one (the stage records count them). The tokens
    equal generate()'s."""
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_even(tmp_path), max_new_tokens=18,
                      pipeline_size=pipeline_size, batch_size=4, schedule="rows", ignore_eos=True)
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == [reference_outputs(tiny_llama, [p], n, ignore_eos=True)[0]
                                                  for p, n in zip(EVEN_TEXTS, EVEN_NEW)]
    assert len({p["prompt_tokens"] for p in prompts}) == 1  # no padding among joiners
    useful = sum(p["prompt_tokens"] + p["new_tokens"] - 1 for p in prompts)
    stages = [r for r in records if r["type"] == "stage"]
    assert [s["rows_computed"] for s in stages] == [useful] * pipeline_size
    assert all(0 < s["max_prompts_in_flight"] <= 4 for s in stages) and max_overlap(prompts) <= 4
    assert [s["rows_moved"] > 0 for s in stages] == [pipeline_size > 1] * pipeline_size, stages


MOVE_DISAGREE = header_edit('''
    if head["move"]:  # a wrong position for the first row it moves
        head["move"]["pos"][0] += 1
''')


def test_a_move_the_stages_disagree_on_is_one_line_on_every_rank(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=_even(tmp_path), max_new_tokens=18,
                      pipeline_size=2, batch_size=4, schedule="rows", ignore_eos=True, timeout_s=90)
    errs = _wrapped_ranks_fail_with_one_line(cfg, tmp_path, MOVE_DISAGREE, 2)
    assert "pipeline protocol error: the first stage's header says moved rows' positions" in errs[1]


MOVES_SEEN = header_edit('''
    if head["move"]:  # every move, to a file
        with open(os.environ["SEEN_FILE"], "a") as f:
            f.write(json.dumps(head["move"]) + "\\n")
''')


def test_rows_move_into_a_slot_with_a_visit_on_its_way(tiny_llama, tmp_path):
    """Batch 8 at pipeline_size 2 (slots of 4), nothing left in the queue: slot 1's short rows end
    while slot 0 runs four long ones, so rows move to slot 1 while its own visit is on its way (they
    go after its rows) until both hold as many; the tokens still equal generate()'s, and every stage
    computed exactly the prompts' positions and one row per later token."""
    texts, new = [f"prompt{i}" for i in range(8)], [30, 30, 30, 30, 2, 2, 20, 20]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": n}) + "\n" for p, n in zip(texts, new)))
    cfg = base_config(tiny_llama, tmp_path, prompts=None, prompts_file=str(path), max_new_tokens=30,
                      pipeline_size=2, batch_size=8, schedule="rows", ignore_eos=True)
    moves, records = _seen_run(cfg, tmp_path, MOVES_SEEN)
    assert any(not m["clear"] and m["n"] > 0 for m in moves), moves
    prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
    assert [p["output_ids"] for p in prompts] == [reference_outputs(tiny_llama, [p], n, ignore_eos=True)[0]
                                                  for p, n in zip(texts, new)]
    stages = [r for r in records if r["type"] == "stage"]
    useful = sum(p["prompt_tokens"] + p["new_tokens"] - 1 for p in prompts)
    assert [s["rows_computed"] for s in stages] == [useful] * 2
    assert [s["rows_moved"] for s in stages] == [sum(len(m["rows"]) for m in moves)] * 2
    assert max_overlap(prompts) <= 8
