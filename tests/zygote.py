"""Starts rank processes for the tests by fork() from an interpreter that has already imported torch,
transformers and pipeinfer, as multiprocessing's forkserver does: a rank then begins at the entry
script's main() instead of spending ~5 s of CPU on imports, which was most of the suite's time.

Each rank is still a real, separate process (its own pid, gloo process group, signals, exit status,
stdout and stderr); only the interpreter start-up is shared. conftest.start_rank() talks to this
server over its stdin/stdout, one JSON line per request:

    {"op": "spawn", "argv": [...], "env": {...}, "cwd": ..., "out": path, "err": path}  -> {"pid": N}
    {"op": "poll", "pid": N}                                                          -> {"code": null | int}

`code` is the exit status, or -signal as subprocess reports a process killed by a signal.
PIPEINFER_TEST_EXEC=1 makes conftest start every rank with a plain exec instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback

os.environ["OMP_NUM_THREADS"] = "1"  # read by torch at import: every test rank runs with one thread
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _preload() -> None:
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import pipeinfer.run.inputs  # noqa: F401  (and through it config, plan, prompts, sampling, ...)
    import pipeinfer.load.stage  # noqa: F401
    import pipeinfer.run.generation  # noqa: F401
    import pipeinfer.run.procgroup  # noqa: F401


def _child(req: dict) -> None:
    """In the forked child: become the rank, run the entry script as __main__, exit with its status."""
    code = 1
    try:
        os.chdir(req["cwd"])
        fds = [os.open(os.devnull, os.O_RDONLY),
               os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644),
               os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        # as a fresh interpreter starts: SIGPIPE ignored (a write to a closed socket is an EPIPE error,
        # not death by signal), SIGINT a KeyboardInterrupt, the others their default
        for sig, how in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL),
                         (signal.SIGUSR1, signal.SIG_DFL), (signal.SIGPIPE, signal.SIG_IGN)):
            signal.signal(sig, how)
        os.environ.clear()
        os.environ.update(req["env"])
        sys.argv = list(req["argv"])
        import runpy
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
    except BaseException:  # what an uncaught exception does to a real interpreter
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def main() -> None:
    _preload()
    requests, replies = sys.stdin, sys.stdout
    done: dict[int, int] = {}
    live: set[int] = set()
    for line in requests:
        req = json.loads(line)
        if req["op"] == "spawn":
            replies.flush()
            pid = os.fork()
            if pid == 0:
                _child(req)
            live.add(pid)
            reply = {"pid": pid}
        else:
            pid = req["pid"]
            if pid in live:
                got, status = os.waitpid(pid, os.WNOHANG)
                if got == pid:
                    live.discard(pid)
                    done[pid] = os.waitstatus_to_exitcode(status)
            reply = {"code": done.get(pid)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    for pid in live:  # the test session ended: leave no rank behind
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass


if __name__ == "__main__":
    main()
