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

from pipeinfer.config import ConfigError, results_path
from pipeinfer.engine import Engine, StartError
from pipeinfer.load.streamer import OffloadError
from pipeinfer.record.metrics import batch_records, run_record, stage_record, summary_record
from pipeinfer.record.replicas import replica_record, share
from pipeinfer.record.results import ResultsError, check_previous, prompt_hash, start_results
from pipeinfer.record.timeline import Timeline
from pipeinfer.run import procgroup
from pipeinfer.run.comm import PeerFailure
from pipeinfer.run.generation import Aborted
from pipeinfer.run.inputs import read_inputs
from pipeinfer.run.runtime import EXIT_REQUEUE, StopRequest, progress_bar, steady_host_memory
from pipeinfer.run.sampling import NonFiniteLogits

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
    output_path = results_path(cfg)  # output_path, or this replica's own file beside it
    mine = share(len(prompts), cfg.replicas, cfg.replica)  # every prompt, or this replica's share
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
        # 3. The writer's checks, then every rank's stage (the engine), each agreed by all before going on.
        previous, problem = (check_previous(output_path, cfg.to_dict(), prompts, cfg.resume,
                                            inputs.dtype_name, device.type) if comm.is_first else (None, None))
        try:
            engine = Engine.load(inputs, comm, problem, abort_requested=stop)
        except StartError as e:
            print(f"error: {e}", file=sys.stderr)
            clean = True
            return 2
        info, stage = engine.info, engine.stage
        todo = comm.broadcast(previous.todo(mine) if comm.is_first else None)

        # 4. Generate: rank 0 submits the prompts still to do and writes each record as its micro-batch
        # finishes; the other ranks serve their stage until rank 0 ends the work.
        if comm.is_first and inputs.score_changes:
            log.info("applying %s from the checkpoint's generation_config.json, as generate() does",
                     ", ".join(f"{k}={v}" for k, v in inputs.score_changes.items()))
        if comm.is_first and todo:
            writer = start_results(output_path, previous, len(mine))
            run = run_record(cfg.to_dict(), inputs.world_size, info.layer_ranges, device, inputs.dtype, info.family,
                             inputs.plan.record())
            if cfg.replicas > 1:
                run["replica"] = replica_record(cfg, [prompt_hash(p.text) for p in prompts])
            writer.write(run)
            bar = progress_bar(len(mine), len(mine) - len(todo), cfg.progress)
        if cfg.profile_steps:
            timeline.trace(cfg.profile_steps, f"{output_path}.rank{rank}.trace.json")
        engine.warm_up()
        # counts only: a list of the records would grow with every prompt (with logprobs, by ~100 KB each)
        finished, new_tokens, interrupted, t0 = 0, 0, False, time.perf_counter()
        try:
            if comm.is_first:
                for i in todo:
                    engine.submit(prompts[i], index=i)
                for batch, result in engine.results():
                    for rec in batch_records(batch, result, prompts, inputs.tokenizer):
                        finished += 1
                        new_tokens += rec["new_tokens"]
                        with timeline.span("write"):  # fsynced: on a slow filesystem this is rank 0's time
                            writer.write(rec)
                    bar.update(len(batch.indices))
                    bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0):.1f} tok/s")
                engine.close()
            else:
                engine.serve()
        except Aborted:
            interrupted = True
        wall_s = time.perf_counter() - t0
        timeline.close()

        # 5. Every rank's stage record gathered on rank 0, then the summary.
        gathered = comm.gather(dict(stage_record(rank, info.layer_ranges[rank], info.param_bytes, device, wall_s, comm,
                                                 engine.max_in_flight, stage.streamer and stage.streamer.record()),
                                    schedule="rows" if engine.rows else "micro_batches",
                                    rows_computed=engine.rows_computed, kv_positions_max=engine.kv_positions_max,
                                    rows_moved=engine.rows_moved, prefill_chunks=engine.prefill_chunks,
                                    packed_visits=engine.packed_visits,
                                    **({"compile": stage.compiled.record()} if stage.compiled else {})))
        done = len(mine) - len(todo) + finished
        if writer is not None:
            for rec in gathered:
                writer.write(rec)
            summary = summary_record(finished, new_tokens, wall_s, done, interrupted)
            writer.write(summary)
            log.info("%d prompts, %d new tokens in %.2fs (%.1f tokens/s) -> %s", summary["prompts"],
                     summary["new_tokens"], wall_s, summary["tokens_per_s"] or 0, output_path)
        elif comm.is_first:
            log.info("all %d prompts are already in %s: nothing to do", len(mine), output_path)
        clean = True
        if interrupted:
            if comm.is_first:
                log.warning("stopped by %s: %d of %d prompts saved; rerun the same config to resume (exit %d)",
                            stop.signal or "a stop request", done, len(mine), EXIT_REQUEUE)
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
