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
import sys
import time

from pipeinfer import procgroup
from pipeinfer.comm import PeerFailure
from pipeinfer.config import ConfigError, micro_batching
from pipeinfer.generation import Aborted, NonFiniteLogits, generate
from pipeinfer.inputs import read_inputs
from pipeinfer.offload import OffloadError
from pipeinfer.metrics import batch_records, reset_peak_memory, run_record, stage_record, summary_record
from pipeinfer.runtime import steady_host_memory
from pipeinfer.prompts import micro_batches
from pipeinfer.results import ResultsError, check_previous, start_results
from pipeinfer.runtime import EXIT_REQUEUE, StopRequest, progress_bar
from pipeinfer.stage import LoadError, load_stage
from pipeinfer.timeline import Timeline

log = logging.getLogger("pipeinfer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="exp_config.json", help="path to exp_config.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key; VALUE is parsed as JSON when it parses, else taken as a string")
    args = ap.parse_args(argv)
    stop = StopRequest().install()

    # 1. Config, model, prompts and the plan, checked identically on every rank before anyone waits.
    try:
        inputs = read_inputs(args.config, args.set)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg, prompts, device, rank = inputs.cfg, inputs.prompts, inputs.device, inputs.rank
    if device.type == "cpu":
        steady_host_memory()  # so that a CPU rank's peak follows the plan (see runtime.steady_host_memory)

    # 2. The process group.
    timeline = Timeline(device, cfg.nvtx, rank)
    try:
        comm = procgroup.init(rank, inputs.world_size, device, cfg.timeout_s, cfg.master_port, timeline,
                              cfg.comm_backend)
    except ConfigError as e:  # raised on every rank alike, from the placements they all gathered
        print(f"error: {e}", file=sys.stderr)
        procgroup.shutdown()
        return 2
    except PeerFailure as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        procgroup.shutdown(clean=False)
        return 1
    writer, bar, clean = None, None, False  # clean: every rank reached the same exit point
    try:
        # 3. The writer's checks, then every rank's stage, each agreed by all before going on.
        previous, problem = (check_previous(cfg.output_path, cfg.to_dict(), [p.text for p in prompts], cfg.resume,
                                            inputs.dtype_name, device.type) if comm.is_first else (None, None))
        ok = comm.all_ok(problem is None)
        if ok:
            try:
                stage, info = load_stage(inputs.plan, rank, inputs.model_config, device, inputs.dtype,
                                         f"{cfg.offload_folder}/rank{rank}", cfg.trust_remote_code)
            except LoadError as e:
                problem = str(e)
            ok = comm.all_ok(problem is None, f"agreeing that every rank loaded its stage (a rank that loads for longer "
                                              f"than timeout_s={cfg.timeout_s:g} also ends here: raise timeout_s)")
        if not ok:
            print(f"error: {problem}" if problem else "error: another rank failed its checks (see its message)",
                  file=sys.stderr)
            clean = True
            return 2
        todo = comm.broadcast(previous.todo(len(prompts)) if comm.is_first else None)

        # 4. Generate; rank 0 writes each prompt's record as soon as its micro-batch is done.
        if comm.is_first and inputs.score_changes:
            log.info("applying %s from the checkpoint's generation_config.json, as generate() does",
                     ", ".join(f"{k}={v}" for k, v in inputs.score_changes.items()))
        if comm.is_first and todo:
            writer = start_results(cfg.output_path, previous, len(prompts))
            writer.write(run_record(cfg.to_dict(), inputs.world_size, info.layer_ranges, device, inputs.dtype,
                                    info.family, inputs.plan.record()))
            bar = progress_bar(len(prompts), len(prompts) - len(todo), cfg.progress)
        if cfg.profile_steps:
            timeline.trace(cfg.profile_steps, f"{cfg.output_path}.rank{rank}.trace.json")
        work = micro_batches(prompts, todo, micro_batching(cfg), inputs.tokenizer.pad_token_id)
        stage.warm_up(inputs.model_config.hidden_size, inputs.dtype, device)
        comm.warm_up_links(inputs.dtype)  # NCCL builds a pair's communicator at its first message: not on the clock
        reset_peak_memory(device)
        # counts only: a list of the records would grow with every prompt (with logprobs, by ~100 KB each)
        finished, new_tokens, interrupted, t0 = 0, 0, False, time.perf_counter()
        try:
            for batch, result in generate(stage, comm, work, inputs.gen, inputs.model_config.hidden_size,
                                          inputs.dtype, stop):
                for rec in batch_records(batch, result, prompts, inputs.tokenizer):
                    finished += 1
                    new_tokens += rec["new_tokens"]
                    with timeline.span("write"):  # fsynced: on a slow filesystem this is rank 0's time
                        writer.write(rec)
                bar.update(len(batch.indices))
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0):.1f} tok/s")
        except Aborted:
            interrupted = True
        wall_s = time.perf_counter() - t0
        timeline.close()

        # 5. Every rank's stage record gathered on rank 0, then the summary.
        gathered = comm.gather(stage_record(rank, info.layer_ranges[rank], info.param_bytes, device, wall_s, comm,
                                            work.max_in_flight, stage.streamer and stage.streamer.record()))
        done = len(prompts) - len(todo) + finished
        if writer is not None:
            for rec in gathered:
                writer.write(rec)
            summary = summary_record(finished, new_tokens, wall_s, done, interrupted)
            writer.write(summary)
            log.info("%d prompts, %d new tokens in %.2fs (%.1f tokens/s) -> %s", summary["prompts"],
                     summary["new_tokens"], wall_s, summary["tokens_per_s"] or 0, cfg.output_path)
        elif comm.is_first:
            log.info("all %d prompts are already in %s: nothing to do", len(prompts), cfg.output_path)
        clean = True
        if interrupted:
            if comm.is_first:
                log.warning("stopped by %s: %d of %d prompts saved; rerun the same config to resume (exit %d)",
                            stop.signal or "a stop request", done, len(prompts), EXIT_REQUEUE)
            return EXIT_REQUEUE
        return 0
    except (PeerFailure, ResultsError, NonFiniteLogits, OffloadError) as e:  # ResultsError: output_path not writable
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        procgroup.shutdown(clean)


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
