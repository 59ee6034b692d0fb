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
  5. then it watches: a Triton that dies is restarted on the same ports, with
     back-off (1, 2, 4... s) and at most `max_restarts` restarts per 10 minutes; a
     dead gateway is restarted likewise. Every event is logged with a timestamp.

With `replicas` > 1 (or a repository in the fleet layout, `fv_serving.fleet`, on a
folder or in S3) it runs that many tritonservers on the one repository, each on its
own ports, and the gateway balances over them; what each replica loads (the live
colour) is read from the repository at every (re)start, so a replica that comes back
after a fleet switch serves the confirmed vector.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fv_serving.atomic import write_json_atomic
from fv_serving.errors import FVError, ServerError
from fv_serving.fleet.layout import COLOURS, colour_model, is_fleet, read_model_config
from fv_serving.fleet.layout import read_state as read_fleet_state
from fv_serving.fleet.locking import fleet_lock
from fv_serving.fleet.recovery import recover_fleet
from fv_serving.fleet.store import Store, open_store
from fv_serving.net import free_port
from fv_serving.procfs import cmdline, is_alive, log_tail
from fv_serving.provenance import now_iso
from fv_serving.triton.control import ensure_key, private_folder
from fv_serving.triton.flags import DEFAULT_GRACE_S, DEFAULT_HOST, DEFAULT_READY_TIMEOUT_S
from fv_serving.triton.locking import switch_lock
from fv_serving.triton.model_config import CONFIG_FILENAME
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

    repository: str  # a folder, or s3://bucket/prefix
    run_dir: Path
    models: tuple[str, ...] = ()
    replicas: int = 1
    host: str = DEFAULT_HOST
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    public: tuple[str, int] | None = None  # the gateway's listen address
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S
    use_gpu: bool = False
    max_restarts: int = 5

    def to_argv(self) -> list[str]:
        argv = ["serve", "--repository", self.repository, "--run-dir", str(self.run_dir)]
        argv += ["--replicas", str(self.replicas)]
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
    servers: tuple[ServerState, ...]
    gateway: dict[str, Any] | None = None
    restarts: int = 0
    updated_at: str = field(default_factory=now_iso)

    @property
    def server(self) -> ServerState:
        """The first replica (the only one of a single-server deployment)."""
        return self.servers[0]

    @property
    def public_url(self) -> str | None:
        """The gateway's address, for clients (None without a gateway)."""
        from fv_serving.gateway.config import GatewayConfig

        return GatewayConfig.from_json(self.gateway["config"]).url if self.gateway else None

    @property
    def admin_url(self) -> str | None:
        """The gateway's admin listener (route flips), when it has one."""
        from fv_serving.gateway.config import GatewayConfig

        return GatewayConfig.from_json(self.gateway["config"]).admin_url if self.gateway else None

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "servers": [s.to_json() for s in self.servers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunState:
        try:
            return cls(**{**data, "servers": tuple(ServerState.from_json(s) for s in data["servers"])})
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
        self.store = open_store(options.repository)
        self.key = ensure_key(self.run_dir)
        self.servers: list[TritonServer] = []
        self.gateway: Any = None  # fv_serving.gateway.process.Gateway when a public address is asked for
        self.restarts: deque[float] = deque()
        single = options.replicas == 1
        self._ports = [
            (options.http_port, options.grpc_port, options.metrics_port) if single else (None, None, None)
            for _ in range(options.replicas)
        ]

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
        self._recover()
        self.servers = [self._start_replica(i) for i in range(self.options.replicas)]
        if self.options.public is not None:
            self._start_gateway()
        self._write_state()

    def watch(self) -> int:
        while True:
            time.sleep(0.5)
            for i, server in enumerate(self.servers):
                if server.is_running():
                    continue
                tail = server.log_tail(8)
                self.log(f"tritonserver pid {server.pid} exited unexpectedly; last log lines:\n{tail}")
                if not self._restart_allowed():
                    self.log(f"giving up: {self.options.max_restarts} restarts within {RESTART_WINDOW_S:.0f} s")
                    return 1
                if len(self.servers) == 1:
                    self._recover()  # nothing else serves: finish an interrupted switch first
                self.servers[i] = self._start_replica(i)
                self._write_state()
            if self.gateway is not None and not self.gateway.is_running():
                self.log(f"gateway pid {self.gateway.pid} exited unexpectedly; restarting it")
                self._start_gateway()
                self._write_state()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
            self.gateway = None
        for server in self.servers:
            server.stop()
        self.servers = []
        (self.run_dir / STATE_FILENAME).unlink(missing_ok=True)
        self.log("stopped")

    # -- steps ---------------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Finish interrupted switches before any replica starts (none runs: recovery may move folders)."""
        timeout = self.options.ready_timeout_s
        if is_fleet(self.store):
            with fleet_lock(self.store, timeout, "recovery before a fleet start"):
                notes = recover_fleet(self.store, [], [], timeout)
        else:
            repo = Path(self.store.url)
            with switch_lock(repo, timeout, "recovery before a server start"):
                notes = recover(repo, None, timeout)
        for note in notes:
            self.log(f"recovery: {note}")

    def served_models(self) -> tuple[str, ...]:
        """What a replica loads: a fleet's two colours (the route picks one), else the ensemble; fused when present."""
        if self.options.models:
            return self.options.models
        fused = (FUSED_MODEL,) if self.store.exists(f"{FUSED_MODEL}/{CONFIG_FILENAME}") else ()
        if is_fleet(self.store):
            return (*(colour_model(c) for c in COLOURS), *fused)
        return (ENSEMBLE_MODEL, *fused)

    def _start_replica(self, index: int) -> TritonServer:
        ports = self._ports[index]
        server = TritonServer(
            self.store.triton_url,
            self.served_models(),
            host=self.options.host,
            http_port=ports[0],
            grpc_port=ports[1],
            metrics_port=ports[2],
            run_dir=self.run_dir / (f"replica-{index}" if self.options.replicas > 1 else ""),
            ready_timeout_s=self.options.ready_timeout_s,
            use_gpu=self.options.use_gpu,
            admin_key=self.key,
            avoid_ports=frozenset({self.options.public[1]}) if self.options.public is not None else frozenset(),
        )
        server.start()
        state = server.state
        self._ports[index] = (state.http_port, state.grpc_port, state.metrics_port)  # a restart keeps them
        self.log(f"tritonserver pid {state.pid} ready at {state.http_url} (models {', '.join(state.models)})")
        return server

    def _start_gateway(self) -> None:
        from fv_serving.gateway.config import GatewayConfig
        from fv_serving.gateway.process import Gateway

        assert self.servers and self.options.public is not None
        host, port = self.options.public
        public = public_models(self.store, self.servers[0].models)
        config = GatewayConfig(
            host=host,
            port=port,
            upstreams=tuple(f"127.0.0.1:{s.state.http_port}" for s in self.servers),
            models=public,
            run_dir=str(self.run_dir / "gateway"),
            admin_host="127.0.0.1",
            admin_port=free_port("127.0.0.1") if is_fleet(self.store) else None,
        )
        self.gateway = Gateway(config, admin_key=self.key).start()
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
        state = RunState(
            supervisor_pid=os.getpid(),
            servers=tuple(s.state for s in self.servers),
            gateway=self.gateway.to_json() if self.gateway is not None else None,
            restarts=len(self.restarts),
        )
        write_json_atomic(self.run_dir / STATE_FILENAME, state.to_json())


def public_models(store: Store, loaded: Sequence[str]) -> tuple[Any, ...]:
    """The gateway's public models: `unlearned` (a fleet's, routed to its live colour) and `fused` when loaded."""
    from fv_serving.gateway.config import PublicModel

    models = []
    if is_fleet(store):
        live = colour_model(read_fleet_state(store).live)
        colours = tuple(colour_model(c) for c in COLOURS)
        config = read_model_config(store, live)
        models.append(PublicModel.from_model_config(config, name=ENSEMBLE_MODEL, upstream_model=live, routes=colours))
    elif ENSEMBLE_MODEL in loaded:
        models.append(PublicModel.from_model_config(read_model_config(store, ENSEMBLE_MODEL)))
    if FUSED_MODEL in loaded:
        models.append(PublicModel.from_model_config(read_model_config(store, FUSED_MODEL)))
    return tuple(models)


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
    for server in state.servers:
        if state_is_running(server):
            terminate_group(server.pid, grace_s, child=None)
            notes.append(f"stopped tritonserver pid {server.pid}")
        else:
            left = end_orphaned_group(server.pid, server.shm_prefix)
            notes.append(
                f"ended {len(left)} leftover process(es) of pid {server.pid}'s group"
                if left
                else f"no process left of pid {server.pid}"
            )
        remove_shm_regions(server.shm_prefix)
    if state.gateway is not None:
        from fv_serving.gateway.process import Gateway

        with contextlib.suppress(FVError):
            Gateway.from_json(state.gateway).stop()
            notes.append("stopped the gateway")
    return notes
