"""lm-eval's command line on a pipeline: started on every rank like the runner; the first rank runs
the harness (which writes its results as it always does), the other ranks serve their stages and
exit with it.

    python -m pipeinfer.evaluate --model_args config=exp_config.json,pipeline_size=1 --tasks lambada_openai
    torchrun --nproc-per-node=2 -m pipeinfer.evaluate --model_args config=exp_config.json --tasks hellaswag \\
        --output_path results/eval --log_samples
    srun ... python -m pipeinfer.evaluate ...          # RANK/WORLD_SIZE from Slurm, as the runner (submit.sbatch)

The arguments are lm-eval's own (`--model pipeinfer` is implied); --model_args are the backend's
(evaluate/settings.py): config=PATH plus any config key as KEY=VALUE. Every rank parses them and
reads the config before any waits on another. Exit codes as the runner's: 0 done, 1 a rank failed
(one line naming it, on every rank, within timeout_s), 2 bad input.
"""

from __future__ import annotations

import sys

from pipeinfer.config import ConfigError


def harness_args(argv: list[str]):
    """lm-eval's parsed arguments, with --model pipeinfer (argparse's own exit 2 for bad ones)."""
    from lm_eval._cli.harness import HarnessCLI

    if "--model" not in argv and not any(a.startswith("--model=") for a in argv):
        argv = ["--model", "pipeinfer", *argv]
    saved = sys.argv
    sys.argv = ["lm_eval", *argv]  # HarnessCLI reads sys.argv (and inserts its `run` command there)
    try:
        cli = HarnessCLI()
        return cli, cli.parse_args()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        import lm_eval  # noqa: F401  (optional at run time: only evaluations need it)
    except ImportError:
        print("error: lm-eval is not installed: pip install 'lm_eval>=0.4,<0.5' (requirements-dev.txt)",
              file=sys.stderr)
        return 2
    from pipeinfer.engine import Engine, StartError
    from pipeinfer.evaluate import lm
    from pipeinfer.evaluate.settings import EvalSettings
    from pipeinfer.load.streamer import OffloadError
    from pipeinfer.run.comm import PeerFailure
    from pipeinfer.run.sampling import NonFiniteLogits

    cli, args = harness_args(argv)
    if getattr(args, "command", None) != "run":
        cli.execute(args)  # `ls`, `validate`: nothing to evaluate, no engine
        return 0
    if args.model != "pipeinfer":
        print(f"error: --model {args.model}: python -m pipeinfer.evaluate runs --model pipeinfer; run lm_eval "
              f"itself for other models", file=sys.stderr)
        return 2
    rank = "?"
    try:
        settings = EvalSettings.read(args.model_args if isinstance(args.model_args, dict) else None)
        with Engine.start(settings.config, settings.overrides) as engine:
            rank = engine.inputs.rank
            if not engine.is_first:
                engine.serve()
                return 0
            lm.use_engine(engine, settings)
            healthy = False
            try:
                cli.execute(args)
                healthy = True
            finally:
                failed = sys.exc_info()[1]
                pipe_failed = isinstance(failed, PeerFailure) or (isinstance(failed, SystemExit) and failed.code == 1)
                if healthy or not pipe_failed:  # done, or the harness or its input failed (not the pipe):
                    lm.stop_engine_loop()       # the other ranks leave now, before the process group goes
                    engine.close()
        return 0
    except (ConfigError, StartError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PeerFailure, NonFiniteLogits, OffloadError) as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
