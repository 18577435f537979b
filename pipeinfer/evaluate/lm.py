"""The `pipeinfer` model of lm-evaluation-harness: every request runs through the Engine, on a model
split across ranks, and is tokenized, truncated and windowed exactly as lm-eval's hf backend does
(lm_eval/models/huggingface.py), so that the numbers are the hf backend's.

    lm_eval --model pipeinfer --model_args config=exp_config.json,pipeline_size=1 --tasks hellaswag
    torchrun --nproc-per-node=2 -m pipeinfer.evaluate --model_args config=exp_config.json --tasks hellaswag

- loglikelihood: lm-eval's own TemplateLM splits each (context, continuation) (trailing spaces
  moved to the continuation, the whole string encoded then split; an empty context becomes the
  prefix token); each full sequence, cut from the left to max_length + 1 tokens as hf cuts it, is
  a scored prompt (max_new_tokens 0): the continuation's log-probabilities sum, and is_greedy is
  whether each of its tokens is its position's argmax. Each distinct sequence is scored once, all
  of them submitted at once, longest first, so that the engine batches them.
- loglikelihood_rolling: hf's disjoint windows of max_length (utils.get_rolling_token_windows with
  the prefix token), each window a scored prompt, summed per document.
- generate_until: the context left-truncated to max_length - max_gen_toks (hf's budget), greedy,
  with the request's `until` strings (and EOS) as stops and max_gen_toks as its max_new_tokens;
  the text decoded and cut at the first stop string, as hf cuts it.

A scored sequence runs without its last token, which is scored from the last position's logits
(Prompt.score_next): the model sees at most max_length tokens, as hf feeds it.

Failures end the evaluation on every rank with one line (a dead peer: exit 1, bad input: exit 2),
raised as SystemExit through the harness, which then writes no results file.
"""

from __future__ import annotations

import atexit
import sys

from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (_add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                  normalize_gen_kwargs, postprocess_generated_text, resolve_max_length)
from tqdm import tqdm

from pipeinfer.config import ConfigError
from pipeinfer.engine import Engine, StartError
from pipeinfer.evaluate.loop import EngineLoop
from pipeinfer.evaluate.settings import EvalSettings
from pipeinfer.load.streamer import OffloadError
from pipeinfer.run.comm import PeerFailure
from pipeinfer.run.prompts import Limits, Prompt
from pipeinfer.run.sampling import NonFiniteLogits
from pipeinfer.run.stops import Stops

_running: dict = {}  # the engine python -m pipeinfer.evaluate started on this rank, for the model it makes
_broken: list = []   # the pipe failure that ended an evaluation (the engine then leaves without a clean end)


def use_engine(engine: Engine, settings: EvalSettings) -> None:
    """The launcher's engine (already started on every rank) for the model lm-eval constructs next."""
    _running.update(engine=engine, settings=settings)
    engine_loop(engine)  # from now: the harness loads its tasks while the other ranks hear keep-alives


def engine_loop(engine: Engine) -> EngineLoop:
    """Rank 0's engine loop (loop.py), started once per engine."""
    if _running.get("loop") is None:
        _running["loop"] = EngineLoop(engine)
    return _running["loop"]


def stop_engine_loop() -> None:
    """End the evaluation's engine loop (the other ranks leave serve()) before the process group
    goes; a loop that does not end within timeout_s is a failure (exit 1)."""
    loop = _running.pop("loop", None)
    if loop is not None and not loop.stop(loop.engine.inputs.cfg.timeout_s + 10):
        raise fail(f"rank {loop.engine.inputs.rank}: the engine did not finish within timeout_s", 1)


def fail(message: str, code: int) -> SystemExit:
    """One line on stderr; the SystemExit passes through the harness, which writes nothing."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(code)


def _leave(ctx) -> None:
    """At exit (lm_eval --model pipeinfer): end the other ranks' work, unless the pipe failed."""
    if _broken:
        ctx.__exit__(type(_broken[0]), _broken[0], None)
    else:
        stop_engine_loop()
        ctx.__exit__(None, None, None)


@register_model("pipeinfer")
class PipeinferLM(TemplateLM):
    def __init__(self, **model_args):
        super().__init__()
        try:
            settings = EvalSettings.read(model_args)
        except ConfigError as e:
            raise fail(str(e), 2) from None
        if _running:  # python -m pipeinfer.evaluate: the engine runs already, started from the same args
            self.engine = _running["engine"]
        else:         # lm_eval --model pipeinfer: this process starts its rank of the engine
            self.engine = self._start(settings)
        self.settings = settings
        inputs = self.engine.inputs
        self.tokenizer = inputs.tokenizer
        self.model_config = inputs.model_config
        self.add_bos_token = settings.add_bos_token
        self.chat_template_args = {}

    @staticmethod
    def _start(settings: EvalSettings) -> Engine:
        ctx = Engine.start(settings.config, settings.overrides)
        try:
            engine = ctx.__enter__()
        except (ConfigError, StartError) as e:
            raise fail(str(e), 2) from None
        except PeerFailure as e:
            raise fail(str(e), 1) from None
        if not engine.is_first:  # a later rank (torchrun lm_eval ...): serve the stage, then leave with rank 0
            try:
                engine.serve()
            except (PeerFailure, NonFiniteLogits, OffloadError) as e:
                print(f"error: rank {engine.inputs.rank}: {e}", file=sys.stderr, flush=True)
                ctx.__exit__(type(e), e, e.__traceback__)
                raise SystemExit(1) from None
            ctx.__exit__(None, None, None)
            raise SystemExit(0)
        atexit.register(_leave, ctx)
        engine_loop(engine)
        return engine

    # -- what lm-eval asks of a TemplateLM, as its hf backend answers -----------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.settings.prefix_token_id is not None:
            return self.settings.prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.settings.max_length or resolve_max_length(self.model_config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return self.settings.max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.engine.inputs.cfg.model_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt,
                                                  **self.chat_template_args)

    # -- requests -----------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        L = self.max_length
        wanted = []  # per request: (its full sequence, how many of its last tokens are the continuation)
        for k, (_, context_enc, continuation_enc) in enumerate(requests):
            if not continuation_enc:
                raise fail(f"loglikelihood request {k}: the continuation tokenizes to nothing (lm-eval's hf backend "
                           f"refuses it too): give the task a non-empty continuation", 2)
            if len(continuation_enc) > L:
                raise fail(f"loglikelihood request {k}: the continuation has {len(continuation_enc)} tokens, more "
                           f"than max_length={L} (as lm-eval's hf backend, the context is cut, never the "
                           f"continuation): raise max_length or shorten the continuation", 2)
            wanted.append((tuple((context_enc + continuation_enc)[-(L + 1):]), len(continuation_enc)))
        scored = self._score({seq for seq, _ in wanted}, disable_tqdm) if wanted else {}
        out = []
        for (request_str, _, _), (seq, n) in zip(requests, wanted):
            logprobs, greedy = scored[seq]
            answer = (float(sum(logprobs[-n:])), all(greedy[-n:]))
            if request_str is not None:  # rolling windows have none: cached per document instead
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            mine = [(None, *utils.make_disjoint_window(w)) for w in utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            windows += mine
            counts.append(len(mine))
        scores = iter(self._loglikelihood_tokens(windows, disable_tqdm))
        out = []
        for req, n in zip(requests, counts):
            total = sum(next(scores)[0] for _ in range(n))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        prompts, untils = [], []
        stopper = self.engine.inputs.gen.stopper
        for k, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample"):
                raise fail(f"generate_until request {k} asks for sampling ({gen_kwargs}): this backend decodes "
                           f"greedily; give the task do_sample: false", 2)
            budget = self.max_length - max_gen_toks
            if budget <= 0:
                raise fail(f"generate_until request {k}: max_gen_toks={max_gen_toks} leaves no room for a context "
                           f"in max_length={self.max_length}: lower max_gen_toks", 2)
            # tok_batch_encode's rule, for a batch of one: no specials when the text starts with BOS
            special = {"add_special_tokens": False} if has_bos_prefix(context, self.tokenizer.bos_token) else \
                {"add_special_tokens": self.add_bos_token} if self.add_bos_token is not None else {}
            ids = self.tokenizer(context, **special)["input_ids"][-budget:]
            if stopper is not None:
                try:
                    stopper.prepare(until)
                except ConfigError as e:
                    raise fail(f"generate_until request {k}: {e}", 2) from None
            prompts.append(Prompt(context, context, list(ids), Stops(tuple(until), ()),
                                  Limits(max_new_tokens=max_gen_toks)))
            untils.append(until)
        out = []
        for req, result, until in zip(requests, self._run(prompts, "generate_until", disable_tqdm), untils):
            text = postprocess_generated_text(self.tok_decode(result), until, None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    # -- through the engine -----------------------------------------------------------------------

    def _score(self, seqs: set, disable_tqdm: bool) -> dict:
        """{sequence: (log-probabilities, greedy flags)} of each token after the first."""
        order = sorted(seqs, key=lambda s: (-len(s), s))  # longest first, as hf batches: similar lengths together
        prompts = [Prompt("", "", list(s[:-1]), Stops(), Limits(max_new_tokens=0), score_next=s[-1]) for s in order]
        return dict(zip(order, self._run(prompts, "loglikelihood", disable_tqdm)))

    def _run(self, prompts: list[Prompt], kind: str, disable_tqdm: bool) -> list:
        """Submit every prompt at once, then collect: per prompt, (log-probabilities, greedy flags)
        of its scored tokens for a scored prompt, else its new token ids."""
        engine = self.engine
        loop = engine_loop(engine)
        slot = {}
        try:
            for k, p in enumerate(prompts):
                slot[engine.submit(p)] = k
        except ConfigError as e:  # past the plan's rows: max_length above max_prompt_tokens
            for i in slot:  # what was queued before it: never run
                engine.cancel(i)
            raise fail(f"{kind}: {e}", 2) from None
        out = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=f"pipeinfer {kind}", disable=disable_tqdm)
        try:
            for i, b, result in loop.take(set(slot)):
                k = slot[i]
                if prompts[k].limits.max_new_tokens == 0:
                    n = len(prompts[k].ids)  # its tokens after the first, and the next one
                    out[k] = (result.prompt_logprobs[b][-n:], result.prompt_greedy[b][-n:])
                else:
                    out[k] = result.output_ids[b]
                bar.update(1)
        except (PeerFailure, NonFiniteLogits, OffloadError) as e:
            bar.close()  # its line ends before the error's
            _broken.append(e)
            raise fail(f"rank {engine.inputs.rank}: {e}", 1) from None
        bar.close()
        return out
