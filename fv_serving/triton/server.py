"""Lifecycle of one real `tritonserver` process: start, wait until ready, stop, clean up.

What can go wrong and how it is guarded (serving.md):
- a model that never becomes ready (the stub hangs in "loading" if it cannot load
  libpython): every start has a ready timeout, after which the process group is
  killed and ServerError carries the last lines of the server log;
- a server that ignores SIGTERM, stubs that outlive it, shm left in /dev/shm:
  `fv_serving.triton.processes`;
- open model control: unless told otherwise (`admin_key=None`, for a server nobody
  else can reach), the model-repository and other operator APIs are locked behind the
  deployment's key (`fv_serving.triton.control`).

Restarts after a crash and detached operation are the supervisor's job
(`fv_serving.triton.supervisor`); this class runs one process at a time.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import tritonclient.http as triton_http

from fv_serving.errors import ServerError
from fv_serving.net import free_port, url_host
from fv_serving.procfs import cmdline, is_alive
from fv_serving.triton.client import TritonClient
from fv_serving.triton.flags import DEFAULT_GRACE_S, DEFAULT_HOST, DEFAULT_READY_TIMEOUT_S, ServerFlags
from fv_serving.triton.install import TritonInstall, find_tritonserver
from fv_serving.triton.model_config import CONFIG_FILENAME
from fv_serving.triton.processes import (
    SHM_STEM,
    cleanup_stale_shm,
    remove_shm_regions,
    terminate_group,
    triton_log_tail,
)

LOG_FILENAME = "server.log"
#: Default of TritonServer(admin_key=...): lock model control behind a fresh random key.
AUTO_KEY = "auto"


@dataclass(frozen=True)
class ServerState:
    """Everything another process needs to find, query or stop a running server."""

    pid: int
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: str
    models: tuple[str, ...]
    run_dir: str
    log_path: str
    shm_prefix: str
    executable: str
    started_at: float

    @property
    def http_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{url_host(self.host)}:{self.metrics_port}/metrics"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "models": list(self.models)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerState:
        try:
            return cls(**{**data, "models": tuple(data["models"])})
        except (KeyError, TypeError) as exc:
            raise ServerError(f"server state is incomplete or has unknown fields: {exc}") from exc


def state_is_running(state: ServerState) -> bool:
    """Whether the process of `state` is alive and is still that server (not a reused pid)."""
    return is_alive(state.pid) and state.shm_prefix in cmdline(state.pid)


class TritonServer:
    """A tritonserver process in explicit model-control mode, started on demand.

        with TritonServer(repo, load_models=["unlearned"]) as server:
            client = TritonClient(server.http_url)

    Ports are picked automatically unless given, never among `avoid_ports` (ports the
    caller has promised to something else that is not listening yet, such as the
    gateway's public port: Triton's metrics port once took the demo's). `load_models=None` loads every model
    folder of the repository. The log goes to `<run_dir>/server.log`; a run folder
    created here is deleted again on a clean stop. Model control is locked behind
    `admin_key`: a fresh random key by default (`server.admin_key`, and
    `server.client()` sends it), a given one, or None for an open server.
    """

    def __init__(
        self,
        repository: str | os.PathLike[str],
        load_models: Sequence[str] | None = None,
        *,
        host: str = DEFAULT_HOST,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        grace_s: float = DEFAULT_GRACE_S,
        use_gpu: bool = False,
        log_verbose: int = 0,
        executable: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        admin_key: str | None = AUTO_KEY,
        avoid_ports: frozenset[int] = frozenset(),
    ) -> None:
        remote = str(repository).startswith("s3://")
        self.repository = str(repository) if remote else str(Path(repository).absolute())
        if not remote and not Path(self.repository).is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        if remote and load_models is None:
            raise ServerError("a repository in object storage needs the models to load named (load_models)")
        self.models = tuple(load_models) if load_models is not None else _model_folders(Path(self.repository))
        if not self.models:
            raise ServerError(f"model repository {self.repository} has no model folder with {CONFIG_FILENAME}")
        self.host = host
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self._avoid_ports = avoid_ports
        self._given_run_dir = Path(run_dir).absolute() if run_dir is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s
        self.use_gpu = use_gpu
        self.log_verbose = log_verbose
        self._executable = executable
        self.extra_args = tuple(extra_args)
        self.admin_key = secrets.token_urlsafe(32) if admin_key == AUTO_KEY else admin_key

        self.shm_prefix = f"{SHM_STEM}{secrets.token_hex(6)}_"
        self.startup_s: float | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._state: ServerState | None = None
        self._run_dir: Path | None = None

    # public API

    @property
    def state(self) -> ServerState:
        if self._state is None:
            raise ServerError("the server is not started")
        return self._state

    @property
    def http_url(self) -> str:
        return self.state.http_url

    @property
    def grpc_url(self) -> str:
        return self.state.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.state.metrics_url

    @property
    def pid(self) -> int:
        return self.state.pid

    @property
    def log_path(self) -> Path:
        return Path(self.state.log_path)

    def client(self, timeout_s: float = 60.0) -> TritonClient:
        """An HTTP client of this server that carries its model-control key."""
        return TritonClient(self.http_url, timeout_s=timeout_s, admin_key=self.admin_key)

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log (empty before start)."""
        return triton_log_tail(self.log_path, lines) if self._state is not None else ""

    def start(self) -> TritonServer:
        """Start the server and wait until it and every requested model are ready.

        Raises ServerError (with the log tail) if it exits or is not ready within
        `ready_timeout_s`; the process group is then killed and its shm removed.
        """
        if self._process is not None:
            raise ServerError("the server is already started")
        cleanup_stale_shm()
        install = find_tritonserver(self._executable)
        self._run_dir = self._given_run_dir or Path(tempfile.mkdtemp(prefix="fv-triton-"))
        self._run_dir.mkdir(parents=True, exist_ok=True)
        auto_ports = all(p is None for p in self._requested_ports)
        attempts = 3 if auto_ports else 1
        for attempt in range(1, attempts + 1):
            try:
                self._launch_and_wait(install)
                break
            except _PortInUseError:
                if attempt == attempts:
                    raise ServerError(f"tritonserver could not bind its ports:\n{self.log_tail()}") from None
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the process group after `grace_s`; remove our shm regions.

        Idempotent, and a no-op after detach(). The run folder is deleted when it was
        created here.
        """
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None:
            return
        terminate_group(process.pid, self.grace_s, child=process)
        remove_shm_regions(self.shm_prefix)
        if self._given_run_dir is None and self._run_dir is not None:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def detach(self) -> ServerState:
        """Stop managing the running process (it keeps running); return its state."""
        state = self.state
        atexit.unregister(self.stop)
        self._process = None
        return state

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # steps of start()

    def _launch_and_wait(self, install: TritonInstall) -> None:
        assert self._run_dir is not None
        ports = _pick_ports(self._requested_ports, self.host, self._avoid_ports)
        log_path = self._run_dir / LOG_FILENAME
        flags = ServerFlags(
            repository=str(self.repository),
            models=self.models,
            http_port=ports[0],
            grpc_port=ports[1],
            metrics_port=ports[2],
            host=self.host,
            admin_key=self.admin_key,
            use_gpu=self.use_gpu,
            log_verbose=self.log_verbose,
            shm_prefix=self.shm_prefix,
            backend_args=install.args,
            extra_args=self.extra_args,
        )
        command = [str(install.executable), *flags.to_args_list()]
        env = {**os.environ, **dict(install.env)}
        started = time.monotonic()
        shown = " ".join(command).replace(self.admin_key, "<key>") if self.admin_key else " ".join(command)
        with open(log_path, "ab") as log:  # appended: a restart keeps the crashed run's log
            log.write(f"# {shown}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() can kill the stubs too
            )
        self._state = ServerState(
            pid=self._process.pid,
            host=self.host,
            http_port=ports[0],
            grpc_port=ports[1],
            metrics_port=ports[2],
            repository=str(self.repository),
            models=self.models,
            run_dir=str(self._run_dir),
            log_path=str(log_path),
            shm_prefix=self.shm_prefix,
            executable=str(install.executable),
            started_at=time.time(),
        )
        try:
            self._wait_until_ready()
        except BaseException:
            process, self._process = self._process, None
            terminate_group(process.pid, grace_s=0.0, child=process)
            remove_shm_regions(self.shm_prefix)
            raise
        self.startup_s = time.monotonic() - started

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        client = triton_http.InferenceServerClient(
            f"{url_host(self.host)}:{self.state.http_port}", connection_timeout=2.0, network_timeout=2.0
        )
        try:
            while True:
                code = self._process.poll()
                if code is not None:
                    tail = self.log_tail()
                    if "Address already in use" in tail or "address already in use" in tail:
                        raise _PortInUseError
                    raise ServerError(
                        f"tritonserver exited with code {code} before it was ready (log: {self.log_path}):\n{tail}"
                    )
                if _all_ready(client, self.models):
                    return
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"tritonserver was not ready within {self.ready_timeout_s:.0f} s "
                        f"(models {', '.join(self.models)}; log: {self.log_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.1)
        finally:
            client.close()  # an open keep-alive connection delays the server's shutdown


class _PortInUseError(Exception):
    """A port picked as free was taken before the server bound it; retried with new ports."""


def _all_ready(client: triton_http.InferenceServerClient, models: Sequence[str]) -> bool:
    try:
        return bool(client.is_server_ready()) and all(client.is_model_ready(m) for m in models)
    except Exception:  # not listening yet, or a connection reset while starting
        return False


def _model_folders(repository: Path) -> tuple[str, ...]:
    return tuple(sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILENAME).is_file()))


def _pick_ports(requested: tuple[int | None, ...], host: str, avoid: frozenset[int]) -> tuple[int, int, int]:
    """The requested ports, free ones from the OS for the others: distinct, and none of `avoid`."""

    def clash(ports: list[int]) -> bool:
        picked = [p for p, r in zip(ports, requested, strict=True) if r is None]
        return len(set(ports)) < len(ports) or bool(avoid.intersection(picked))

    given = [p for p in requested if p is not None]
    if len(set(given)) < len(given):
        raise ServerError(f"the http, grpc and metrics ports must differ, got {requested}")
    ports = [p if p is not None else free_port(host) for p in requested]
    while clash(ports):  # the OS handed out a duplicate or a promised port: ask again
        ports = [p if r is not None else free_port(host) for p, r in zip(ports, requested, strict=True)]
    return ports[0], ports[1], ports[2]
