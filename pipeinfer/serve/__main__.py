"""An OpenAI-compatible server on the first rank; the other ranks serve their stages.

    python -m pipeinfer.serve --config exp_config.json [--host 127.0.0.1] [--port 8000] [--api-key K]
    torchrun --nproc-per-node=2 -m pipeinfer.serve --config exp_config.json
    srun ... python -m pipeinfer.serve --config exp_config.json      (serve.sbatch)

Every rank starts as the batch runner's do; the first binds its port before the ranks agree that
every stage loaded (a port in use is bad input, exit 2, on every rank), and listens once they
have. SIGTERM on the first rank drains: no new connections, running requests finish (within
timeout_s), then every rank exits 0 (the other ranks ignore SIGTERM and end when the first ends
the work, as under srun every rank gets it). A dead or stuck peer fails the engine: open requests
end with an error, /health answers 503, and every rank exits 1 with one line within timeout_s.

Exit codes: 0 drained; 1 a rank failed; 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from pipeinfer.config import ConfigError
from pipeinfer.engine import Engine, StartError
from pipeinfer.record.timeline import Timeline
from pipeinfer.run import procgroup
from pipeinfer.run.comm import PeerFailure
from pipeinfer.run.inputs import read_inputs

log = logging.getLogger("pipeinfer")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="exp_config.json", help="path to exp_config.json")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    ap.add_argument("--api-key", default=os.environ.get("PIPEINFER_API_KEY") or None,
                    help="require Authorization: Bearer KEY on /v1/ (default: $PIPEINFER_API_KEY)")
    ap.add_argument("--served-model-name", default=None, help="the model name clients send (default: model_path "
                                                                "or its last part)")
    args = ap.parse_args(argv)
    try:
        inputs = read_inputs(args.config, args.set, prompts_required=False)  # requests come over HTTP
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rank, cfg = inputs.rank, inputs.cfg
    if rank != 0:  # under srun every rank gets SIGTERM (and SIGUSR1 before the time limit): the first drains,
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # the others end when it ends the work
            signal.signal(sig, lambda s, _: log.info("signal %d: rank %d ends when rank 0 has drained", s, rank))
    sock, problem = (_listen(args.host, args.port) if rank == 0 else (None, None))
    try:
        comm = procgroup.init(rank, inputs.world_size, inputs.device, cfg.timeout_s, cfg.master_port,
                              Timeline(inputs.device, cfg.nvtx, rank), cfg.comm_backend)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        procgroup.shutdown()
        return 2
    except PeerFailure as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        procgroup.shutdown(clean=False)
        return 1
    clean = False
    try:
        try:
            engine = Engine.load(inputs, comm, problem)
        except StartError as e:
            print(f"error: {e}", file=sys.stderr)
            clean = True
            return 2
        engine.warm_up()
        if engine.is_first:
            failure = _serve_http(engine, sock, args)
            if failure is not None:
                print(f"error: rank 0: {failure}", file=sys.stderr)
                return 1
        else:
            engine.serve()
        clean = True
        return 0
    except PeerFailure as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        return 1
    finally:
        procgroup.shutdown(clean)


def _listen(host: str, port: int) -> tuple[socket.socket | None, str | None]:
    """The listening socket, bound before the ranks agree to go on: a port in use is bad input."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.set_inheritable(True)
        return sock, None
    except OSError as e:
        return None, f"--host {host} --port {port}: cannot listen there ({e.strerror}): give a free port (--port 0: any)"


def _serve_http(engine, sock: socket.socket, args) -> str | None:
    """Run uvicorn on this thread and the engine on another until SIGTERM (None) or a failure (its line)."""
    import uvicorn

    from pipeinfer.serve.app import create_app
    from pipeinfer.serve.driver import Driver
    from pipeinfer.serve.requests import served_names

    cfg = engine.inputs.cfg
    driver = Driver(engine, cfg.max_queued_requests)
    names = served_names(cfg, args.served_model_name)
    app = create_app(driver, engine, names, args.api_key)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGTERM/SIGINT: drain (/health fails, new requests get 503), then exit 0. Not
            uvicorn's own, which raises the signal again once drained: the process would die of it."""
            driver.draining = True
            self.force_exit = self.should_exit and sig == signal.SIGINT  # a second Ctrl+C: now
            self.should_exit = True

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=int(cfg.timeout_s),
                                   timeout_keep_alive=5))

    def on_failure():
        server.should_exit = True

    async def run():
        signal.signal(signal.SIGUSR1, server.handle_exit)  # submit.sbatch's time-limit warning: drain too
        driver.start(asyncio.get_running_loop(), on_failure)
        host, port = sock.getsockname()[:2]
        print(f"pipeinfer.serve: ready: http://{host}:{port}/v1 serving {names[0]!r} on "
              f"{engine.inputs.world_size} rank(s)" + _tunnel_hint(host, port), flush=True)
        await server.serve(sockets=[sock])

    try:
        asyncio.run(run())
    finally:
        driver.cancel(list(driver.open.values()))  # none once drained; past the drain's bound, rows free now
        engine.close()  # the engine thread finishes what runs, then ends the work on every rank
        driver.thread.join(cfg.timeout_s)
    if driver.failure is None and driver.thread.is_alive():  # never leave the process group under a running engine
        return f"the requests still running did not finish within timeout_s={cfg.timeout_s:g} of the drain"
    return driver.failure


def _tunnel_hint(host: str, port: int) -> str:
    """Under Slurm: the node, and the ssh command that reaches the port from a login node."""
    if not os.environ.get("SLURM_JOB_ID"):
        return ""
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # the node's name as Slurm knows it
    target = "127.0.0.1" if host in ("127.0.0.1", "localhost") else node
    login = os.environ.get("SLURM_SUBMIT_HOST", "<login node>")
    return (f"\npipeinfer.serve: node {node} port {port}; from your machine: "
            f"ssh -N -L {port}:{target}:{port} -J {login} {node}   then  http://127.0.0.1:{port}/v1")


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as the batch runner: no interpreter teardown after gloo (see run_distributed_inference.py)
