#!/usr/bin/env python3
"""Pipeline-parallel generation with a Hugging Face causal LM split across ranks.

    torchrun --nproc-per-node=2 run_distributed_inference.py --config exp_config.json
    python run_distributed_inference.py --config exp_config.json --set pipeline_size=1
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python run_distributed_inference.py ...   # as srun starts ranks

Exit codes: 0 done; 1 failed (the message names the peer and what this rank was doing);
2 bad input; 75 stopped by SIGTERM/SIGUSR1 with finished prompts saved (rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

from pipeinfer import comm as pcomm
from pipeinfer.config import ConfigError, check_model, check_world, load_config, micro_batching, world_from_env
from pipeinfer.families import family_for
from pipeinfer.generation import Aborted, GenParams, generate
from pipeinfer.metrics import device_name, peak_memory_bytes, prompt_record, run_record, summary_record
from pipeinfer.partition import StagePlan
from pipeinfer.prompts import check_lengths, load_prompts, load_tokenizer, make_batches
from pipeinfer.results import ResultsError, ResultsWriter, check_writable, scan_previous
from pipeinfer.runtime import (EXIT_REQUEUE, StopRequest, generation_ids, load_generation_config, pick_device,
                               progress_bar, read_model_config, score_settings, setup_logging)
from pipeinfer.sampling import SamplingParams
from pipeinfer.stage import LoadError, partition_model, resolve_dtype, saved_dtype
from pipeinfer.timeline import Timeline

log = logging.getLogger("pipeinfer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="exp_config.json", help="path to exp_config.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key; VALUE is parsed as JSON when it parses, else taken as a string")
    args = ap.parse_args(argv)
    stop = StopRequest().install()

    # 1. Config and inputs, checked identically on every rank before anyone waits on anyone.
    try:
        rank, world_size, local_rank = world_from_env()
        setup_logging(rank)
        cfg = load_config(args.config, args.set)
        check_world(cfg, world_size)
        model_config = read_model_config(cfg.model_path, cfg.trust_remote_code)
        family_for(model_config.model_type)
        check_model(cfg, model_config.num_hidden_layers)
        prompts = load_prompts(cfg)
        tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
        prompt_lengths = check_lengths(tokenizer, prompts, getattr(model_config, "max_position_embeddings", None),
                                       cfg.max_new_tokens)
        gen_config = load_generation_config(cfg.model_path, model_config)
        score_changes = score_settings(gen_config)
        eos_ids, pad_id = generation_ids(gen_config, model_config, tokenizer)
        device = pick_device(cfg.device, local_rank)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = resolve_dtype(cfg.dtype, device, saved_dtype(model_config))

    # 2. Process group; the writer's checks and every rank's stage load, agreed before going on.
    timeline = Timeline(device, cfg.nvtx, rank)
    try:
        comm = pcomm.init(rank, world_size, device, cfg.timeout_s, cfg.master_port, timeline, cfg.comm_backend)
    except ConfigError as e:  # raised on every rank alike, from the placements they all gathered
        print(f"error: {e}", file=sys.stderr)
        pcomm.shutdown()
        return 2
    except pcomm.PeerFailure as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        pcomm.shutdown(clean=False)
        return 1
    writer, bar, clean = None, None, False  # clean: every rank reached the same exit point
    try:
        problem, todo = None, None
        if comm.is_first:
            try:
                problem = check_writable(cfg.output_path)
                if problem is None:
                    previous = scan_previous(cfg.output_path, cfg.to_dict(), prompts, cfg.resume,
                                             str(dtype).removeprefix("torch."), device.type)
                    todo = [i for i in range(len(prompts)) if i not in previous.done]
            except (ResultsError, OSError) as e:
                problem = str(e)
        if comm.all_ok(problem is None):
            try:
                stage, info = partition_model(cfg.model_path, StagePlan(rank, world_size, range(0)), device, dtype,
                                              f"{cfg.offload_folder}/rank{rank}", cfg=cfg,
                                              longest_prompt=max(prompt_lengths), model_config=model_config)
            except LoadError as e:
                problem = str(e)
            ok = comm.all_ok(problem is None, f"agreeing that every rank loaded its stage (a rank that loads for longer "
                                              f"than timeout_s={cfg.timeout_s:g} also ends here: raise timeout_s)")
        else:
            ok = False
        if not ok:
            print(f"error: {problem}" if problem else "error: another rank failed its checks (see its message)",
                  file=sys.stderr)
            clean = True
            return 2
        todo = comm.broadcast(todo)
        if comm.is_first and len(todo) < len(prompts):
            log.info("resuming: %d of %d prompts already in %s", len(prompts) - len(todo), len(prompts),
                     cfg.output_path)

        # 3. Generate, batch by batch; rank 0 writes each prompt's record as soon as it is done.
        if comm.is_first and score_changes:
            log.info("applying %s from the checkpoint's generation_config.json, as generate() does",
                     ", ".join(f"{k}={v}" for k, v in score_changes.items()))
        gp = GenParams(cfg.max_new_tokens, cfg.ignore_eos, eos_ids, pad_id,
                       SamplingParams(cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p), cfg.seed,
                       gen_config if score_changes else None)
        if comm.is_first and todo:
            writer = ResultsWriter(cfg.output_path)
            writer.write(run_record(cfg.to_dict(), world_size, info.layer_ranges, device, dtype, info.family))
        if cfg.profile_steps:
            timeline.trace(cfg.profile_steps, f"{cfg.output_path}.rank{rank}.trace.json")
        if writer is not None:
            bar = progress_bar(len(prompts), len(prompts) - len(todo), cfg.progress)
        records, interrupted, new_tokens = [], False, 0
        micro_batch_size, in_flight = micro_batching(cfg)
        batches = make_batches(tokenizer, prompts, todo, micro_batch_size)
        stage.warm_up(model_config.hidden_size, dtype, device)
        t0 = time.perf_counter()
        try:
            for batch, result in generate(stage, comm, batches, in_flight, gp, model_config.hidden_size, dtype, stop):
                for i, ids, times, n in zip(batch.indices, result.output_ids, result.token_times,
                                            batch.prompt_tokens):
                    text = tokenizer.decode(ids, skip_special_tokens=True)
                    records.append(prompt_record(i, prompts[i], text, ids, n, times, result.start_s))
                    writer.write(records[-1])
                    new_tokens += len(ids)
                bar.update(len(batch.indices))
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0):.1f} tok/s")
        except Aborted:
            interrupted = True
        wall_s = time.perf_counter() - t0
        timeline.close()

        # 4. Per-stage metrics gathered on rank 0, then the summary.
        layers = info.layer_ranges[rank]
        mine = {"type": "stage", "rank": rank, "hostname": socket.gethostname(), "device": device_name(device),
                "layers": [layers.start, layers.stop - 1],
                "param_bytes": info.param_bytes, "wall_s": wall_s, "bytes_sent": comm.bytes_sent,
                "comm_backend": comm.backend,
                "peak_memory_bytes": peak_memory_bytes(device), **comm.timeline.record()}
        gathered = comm.gather(mine)
        if writer is not None:
            for rec in gathered:
                writer.write(rec)
            total = len(prompts) - len(todo) + len(records)
            summary = summary_record(records, wall_s, total, interrupted)
            writer.write(summary)
            log.info("%d prompts, %d new tokens in %.2fs (%.1f tokens/s) -> %s", summary["prompts"],
                     summary["new_tokens"], wall_s, summary["tokens_per_s"] or 0, cfg.output_path)
        elif comm.is_first:
            log.info("all %d prompts are already in %s: nothing to do", len(prompts), cfg.output_path)
        clean = True
        if interrupted:
            if comm.is_first:
                log.warning("stopped by %s: %d of %d prompts saved; rerun the same config to resume (exit %d)",
                            stop.signal or "a stop request", len(prompts) - len(todo) + len(records), len(prompts),
                            EXIT_REQUEUE)
            return EXIT_REQUEUE
        return 0
    except (pcomm.PeerFailure, ResultsError) as e:  # ResultsError here: output_path could not be written
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        pcomm.shutdown(clean)


if __name__ == "__main__":
    code = main()
    # Everything this process writes is closed (and the results fsynced) by now: end without the
    # interpreter's teardown. With torch 2.13, C++ destructors run there can abort a process that
    # used gloo ("terminate called without an active exception", about 1 run in 70 of a two-rank
    # job that exits right after its checks; no Python frame left), and a profile that recorded
    # gloo ops crashes when freed (see Timeline.close()).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
