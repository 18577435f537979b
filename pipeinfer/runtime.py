"""Process-level setup shared by the entry script: logging, device choice, the model's config."""

from __future__ import annotations

import json
import logging
import os
import signal

import torch

from pipeinfer.config import ConfigError

# Exit status when SIGTERM or SIGUSR1 (Slurm's warning before the time limit) stopped the run
# early with its finished prompts saved: "try again later" (EX_TEMPFAIL), so a batch script requeues.
EXIT_REQUEUE = 75


class StopRequest:
    """Set by SIGTERM / SIGUSR1; polled by the first stage between steps."""

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        logging.getLogger("pipeinfer").warning("%s received: stopping after the current step", self.signal)

    def __call__(self) -> bool:
        return self.signal is not None


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    # Loading progress bars and accelerate's note about meta tensors are noise here: the meta
    # tensors are the other stages' weights, dropped on purpose.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def progress_bar(total: int, done: int, enabled: bool):
    """Prompts done and tokens/s on rank 0's stderr; silent when stderr is not a terminal."""
    import shutil

    from tqdm import tqdm

    # shutil falls back to 80 columns where a terminal reports a width of 0 (some ptys do)
    return tqdm(total=total, initial=done, unit="prompt", desc="generating", disable=None if enabled else True,
                ncols=shutil.get_terminal_size().columns)


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=\"cuda\" but torch sees no GPU (in Apptainer, pass --nv): use device=\"cpu\" or \"auto\"")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def read_model_config(model_path: str, trust_remote_code: bool = False):
    """The checkpoint's config.json, with a one-line ConfigError when the directory is not a model, or
    when it needs its own Python code (auto_map) and trust_remote_code is not set."""
    from transformers import AutoConfig

    if not os.path.isdir(model_path):
        raise ConfigError(f"model_path={model_path!r} is not a directory: stage the model there first "
                          f"(weights are never downloaded) or fix the path")
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ConfigError(f"model_path={model_path!r} has no config.json: copy the whole checkpoint directory")
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            auto_map = json.load(f).get("auto_map")
        if auto_map and not trust_remote_code:
            raise ConfigError(f"model_path={model_path!r} needs its own Python code (config.json has auto_map: "
                              f"{', '.join(auto_map)}): set trust_remote_code=true only if you trust that code")
        return AutoConfig.from_pretrained(model_path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ConfigError:
        raise
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"model_path={model_path!r}: config.json cannot be read "
                          f"({str(e).splitlines()[0][:160]})") from None


def load_generation_config(model_path: str, model_config):
    """The checkpoint's generation_config.json as generate() reads it, else one derived from config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except OSError:
        return GenerationConfig.from_model_config(model_config)


# generation_config.json settings that change which token generate() picks, even greedy, with their
# neutral values (transformers 5 defaults them to None, 4.57 to these): the last stage applies them
# with transformers' own logits processors (sampling.checkpoint_processors).
SCORE_SETTINGS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                  "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": 0,
                  "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
                  "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                  "sequence_bias": None}


def score_settings(gen) -> dict:
    """The SCORE_SETTINGS this generation config sets to other than their neutral values.
    ConfigError for settings no pipeline stage can apply (they run the model again per step)."""
    for name, neutral in (("guidance_scale", 1.0), ("watermarking_config", None)):
        if getattr(gen, name, None) not in (None, neutral):
            raise ConfigError(f"the checkpoint's generation_config.json sets {name}={getattr(gen, name)!r}, which this "
                              f"runner cannot apply (it needs extra model passes per step): remove it there")
    return {k: getattr(gen, k) for k, neutral in SCORE_SETTINGS.items()
            if getattr(gen, k, None) not in (None, neutral, [], {})}


def generation_ids(gen, model_config, tokenizer) -> tuple[tuple[int, ...], int]:
    """(eos ids, pad id) as generate() would use them: generation_config.json first, then config.json."""
    eos = gen.eos_token_id if gen.eos_token_id is not None else model_config.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)
