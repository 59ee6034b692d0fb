"""`fv serve`: one supervisor process that owns a deployment's tritonserver (and its gateway) and keeps them up.

What it does, in order:
  1. recovery (`fv_serving.triton.recovery`) under the switch lock, before any server
     starts: an interrupted switch is never served, and the journal says so;
  2. the deployment's model-control key (`fv_serving.triton.control`), then Triton on
     loopback with the operator APIs locked behind it;
  3. optionally the gateway (`fv_serving.gateway`) on the public address, in front of
     Triton, exposing only the public models;
  4. the run state (`server.json` in the run folder, 0700) for `fv status`,
     `fv switch`, `fv infer` and `fv stop` to find everything;
  5. then it watches: a Triton that dies is restarted on the same ports after recovery,
     with back-off (1, 2, 4... s) and at most `max_restarts` restarts per 10 minutes;
     a dead gateway is restarted likewise. Every event is logged with a timestamp.
SIGTERM and SIGINT stop everything cleanly. `--detach` runs this same supervisor as a
daemon (its own session, output to supervisor.log) and returns once it is ready.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fv_serving.atomic import write_json_atomic
from fv_serving.errors import FVError, ServerError
from fv_serving.procfs import cmdline, is_alive, log_tail
from fv_serving.provenance import now_iso
from fv_serving.triton import model_config as mcfg
from fv_serving.triton.control import ensure_key, private_folder
from fv_serving.triton.flags import DEFAULT_GRACE_S, DEFAULT_HOST, DEFAULT_READY_TIMEOUT_S
from fv_serving.triton.locking import switch_lock
from fv_serving.triton.processes import end_orphaned_group, remove_shm_regions, terminate_group
from fv_serving.triton.recovery import recover
from fv_serving.triton.repository import ENSEMBLE_MODEL, FUSED_MODEL
from fv_serving.triton.server import ServerState, TritonServer, state_is_running
from fv_serving.triton.signals import interrupt_on_stop_signals

STATE_FILENAME = "server.json"
SUPERVISOR_LOG = "supervisor.log"
RESTART_WINDOW_S = 600.0
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class ServeOptions:
    """Everything `fv serve` was asked for; `to_argv` re-creates the command for a detached supervisor."""

    repository: Path
    run_dir: Path
    models: tuple[str, ...] = ()
    host: str = DEFAULT_HOST
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    public: tuple[str, int] | None = None  # the gateway's listen address
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    use_gpu: bool = False
    max_restarts: int = 5

    def served_models(self) -> tuple[str, ...]:
        return self.models or (ENSEMBLE_MODEL, *((FUSED_MODEL,) if (self.repository / FUSED_MODEL).is_dir() else ()))

    def to_argv(self) -> list[str]:
        argv = ["serve", "--repository", str(self.repository), "--run-dir", str(self.run_dir)]
        if self.models:
            argv += ["--models", *self.models]
        argv += ["--host", self.host, "--ready-timeout", str(self.ready_timeout_s)]
        argv += ["--max-restarts", str(self.max_restarts)]
        for flag, port in (("--http-port", self.http_port), ("--grpc-port", self.grpc_port)):
            if port is not None:
                argv += [flag, str(port)]
        if self.metrics_port is not None:
            argv += ["--metrics-port", str(self.metrics_port)]
        if self.public is not None:
            argv += ["--public", f"{self.public[0]}:{self.public[1]}"]
        if self.use_gpu:
            argv.append("--gpu")
        return argv


@dataclass(frozen=True)
class RunState:
    """What the supervisor publishes about the deployment it runs."""

    supervisor_pid: int
    server: ServerState
    gateway: dict[str, Any] | None = None
    restarts: int = 0
    updated_at: str = field(default_factory=now_iso)

    @property
    def public_url(self) -> str | None:
        """The gateway's address, for clients (None without a gateway)."""
        from fv_serving.gateway.config import GatewayConfig

        return GatewayConfig.from_json(self.gateway["config"]).url if self.gateway else None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "server": self.server.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        try:
            return cls(**{**data, "server": ServerState.from_json(data["server"])})
        except (KeyError, TypeError) as exc:
            raise ServerError(f"run state is incomplete or has unknown fields: {exc}") from exc


def read_run_state(run_dir: str | os.PathLike[str]) -> RunState:
    path = Path(run_dir) / STATE_FILENAME
    try:
        return RunState.from_json(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ServerError(f"no server state in {run_dir}: start one with `fv serve` (or give --url)") from exc
    except json.JSONDecodeError as exc:
        raise ServerError(f"server state {path} is not valid JSON: {exc}") from exc


def supervisor_alive(state: RunState, run_dir: Path) -> bool:
    """The supervisor of `state` still runs (and its pid was not reused: its command line names the run folder)."""
    return is_alive(state.supervisor_pid) and str(run_dir) in cmdline(state.supervisor_pid)


class Supervisor:
    """Runs one deployment until told to stop; see the module docstring."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.run_dir = private_folder(options.run_dir)
        self.server: TritonServer | None = None
        self.gateway: Any = None  # fv_serving.gateway.process.Gateway when a public address is asked for
        self.restarts: deque[float] = deque()
        self._ports = (options.http_port, options.grpc_port, options.metrics_port)

    def log(self, message: str) -> None:
        """One timestamped line on stdout (supervisor.log when detached)."""
        print(f"{now_iso()} fv serve: {message}", flush=True)

    # -- lifecycle -----------------------------------------------------------------------------------

    def run(self) -> int:
        """Foreground: start, watch, restart; 0 after a stop signal, 1 when Triton cannot be kept up."""
        with interrupt_on_stop_signals():
            try:
                self.start()
                return self.watch()
            except KeyboardInterrupt:
                self.log("stop signal received")
                return 0
            finally:
                self.stop()

    def start(self) -> None:
        self._start_server()
        if self.options.public is not None:
            self._start_gateway()
        self._write_state()

    def watch(self) -> int:
        while True:
            time.sleep(0.5)
            assert self.server is not None
            if not self.server.is_running():
                tail = self.server.log_tail(8)
                self.log(f"tritonserver pid {self.server.pid} exited unexpectedly; last log lines:\n{tail}")
                if not self._restart_allowed():
                    self.log(f"giving up: {self.options.max_restarts} restarts within {RESTART_WINDOW_S:.0f} s")
                    return 1
                self._start_server()
                self._write_state()
            if self.gateway is not None and not self.gateway.is_running():
                self.log(f"gateway pid {self.gateway.pid} exited unexpectedly; restarting it")
                self._start_gateway()
                self._write_state()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        (self.run_dir / STATE_FILENAME).unlink(missing_ok=True)
        self.log("stopped")

    # -- steps ---------------------------------------------------------------------------------------

    def _start_server(self) -> None:
        repo = self.options.repository
        with switch_lock(repo, self.options.ready_timeout_s, "recovery before a server start"):
            for note in recover(repo, None, self.options.ready_timeout_s):
                self.log(f"recovery: {note}")
            server = TritonServer(
                repo,
                self.options.served_models(),
                host=self.options.host,
                http_port=self._ports[0],
                grpc_port=self._ports[1],
                metrics_port=self._ports[2],
                run_dir=self.run_dir,
                ready_timeout_s=self.options.ready_timeout_s,
                use_gpu=self.options.use_gpu,
                admin_key=ensure_key(self.run_dir),
            )
            server.start()
        self.server = server
        state = server.state
        self._ports = (state.http_port, state.grpc_port, state.metrics_port)  # a restart keeps the addresses
        self.log(f"tritonserver pid {state.pid} ready at {state.http_url} (models {', '.join(state.models)})")

    def _start_gateway(self) -> None:
        from fv_serving.gateway.config import GatewayConfig, PublicModel
        from fv_serving.gateway.process import Gateway

        assert self.server is not None and self.options.public is not None
        host, port = self.options.public
        public = [
            PublicModel.from_model_config(mcfg.read_config(self.options.repository / name))
            for name in self.server.models
            if name in (ENSEMBLE_MODEL, FUSED_MODEL)
        ]
        config = GatewayConfig(
            host=host,
            port=port,
            upstreams=(f"127.0.0.1:{self.server.state.http_port}",),
            models=tuple(public),
            run_dir=str(self.run_dir / "gateway"),
        )
        self.gateway = Gateway(config).start()
        self.log(f"gateway pid {self.gateway.pid} serving {', '.join(m.name for m in public)} at {self.gateway.url}")

    def _restart_allowed(self) -> bool:
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= self.options.max_restarts:
            return False
        backoff = min(MAX_BACKOFF_S, 2.0 ** len(self.restarts))
        self.log(f"restarting tritonserver in {backoff:.0f} s (restart {len(self.restarts) + 1})")
        time.sleep(backoff)
        self.restarts.append(time.monotonic())
        return True

    def _write_state(self) -> None:
        assert self.server is not None
        state = RunState(
            supervisor_pid=os.getpid(),
            server=self.server.state,
            gateway=self.gateway.to_json() if self.gateway is not None else None,
            restarts=len(self.restarts),
        )
        write_json_atomic(self.run_dir / STATE_FILENAME, state.to_json())


# -- detached operation ------------------------------------------------------------------------------


def start_detached(options: ServeOptions) -> RunState:
    """Run the supervisor as a daemon (own session, output to supervisor.log); return once it is ready."""
    run_dir = private_folder(options.run_dir)
    (run_dir / STATE_FILENAME).unlink(missing_ok=True)
    log_path = run_dir / SUPERVISOR_LOG
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "fv_serving.cli.main", *options.to_argv()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + options.ready_timeout_s + 30.0
    while time.monotonic() < deadline:
        code = child.poll()
        if code is not None:
            raise ServerError(f"fv serve exited with code {code} before it was ready:\n{log_tail(log_path, 20)}")
        with contextlib.suppress(ServerError):
            state = read_run_state(run_dir)
            if state.supervisor_pid == child.pid:
                return state
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGTERM)
    raise ServerError(f"fv serve was not ready within {options.ready_timeout_s:.0f} s:\n{log_tail(log_path, 20)}")


def stop_deployment(run_dir: str | os.PathLike[str], grace_s: float = DEFAULT_GRACE_S) -> str:
    """Stop what a run folder's state describes; works when the supervisor (or the server) is already dead."""
    run_dir = Path(run_dir).absolute()
    state = read_run_state(run_dir)
    if supervisor_alive(state, run_dir):
        os.kill(state.supervisor_pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 30.0
        while is_alive(state.supervisor_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not is_alive(state.supervisor_pid):
            (run_dir / STATE_FILENAME).unlink(missing_ok=True)
            return (
                f"stopped the deployment (supervisor pid {state.supervisor_pid}, tritonserver pid {state.server.pid})"
            )
        with contextlib.suppress(ProcessLookupError):
            os.kill(state.supervisor_pid, signal.SIGKILL)
    notes = _clean_up_without_supervisor(state, grace_s)
    (run_dir / STATE_FILENAME).unlink(missing_ok=True)
    return "supervisor was not running; " + "; ".join(notes)


def _clean_up_without_supervisor(state: RunState, grace_s: float) -> list[str]:
    notes = []
    server = state.server
    if state_is_running(server):
        terminate_group(server.pid, grace_s, child=None)
        notes.append(f"stopped tritonserver pid {server.pid}")
    else:
        left = end_orphaned_group(server.pid, server.shm_prefix)
        notes.append(f"ended {len(left)} leftover process(es) of its group" if left else "no server process left")
    remove_shm_regions(server.shm_prefix)
    if state.gateway is not None:
        from fv_serving.gateway.process import Gateway

        with contextlib.suppress(FVError):
            Gateway.from_json(state.gateway).stop()
            notes.append("stopped the gateway")
    return notes
