"""Lifecycle of a real `tritonserver` process: locate, start, wait until ready, stop, clean up.

Which binary: a `tritonserver` on PATH (or /opt/tritonserver/bin) when there is one,
which is what production hosts and NVIDIA's container have; otherwise the server
bundled in the nvidia-pytriton wheel, copied once into a private cache folder and
completed with the python-backend stub of the running Python (the wheel ships the
stubs beside the tree, not in it; `prepare_bundled_tritonserver` and `_bundled_install`
say why each step is needed).

What can go wrong and how it is guarded:
- a model that never becomes ready (the stub hangs in "loading" if it cannot load
  libpython): every start has a ready timeout, after which the process group is
  killed and ServerError carries the last lines of the server log;
- a server that ignores SIGTERM: stop sends SIGTERM, waits a grace period, then
  SIGKILLs the whole process group (the server runs in its own session, so its
  python-backend stubs go with it and nothing is orphaned);
- shared-memory regions left in /dev/shm by a killed server: each server gets a
  unique python-backend shm prefix; stop removes its own regions, and every start
  removes regions of ours that no live process maps any more.

A server can also be started detached (`start_detached`) for a CLI: its state
(pid, ports, log, shm prefix) goes to a JSON file that another process reads to
find or stop it (`read_state`, `stop_from_state`).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import tritonclient.http as triton_http

from fv_serving.atomic import atomic_directory, write_json_atomic
from fv_serving.errors import ServerError
from fv_serving.triton.model_config import CONFIG_FILENAME

DEFAULT_HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 60.0
DEFAULT_GRACE_S = 15.0
EXIT_TIMEOUT_S = 5  # Triton's own wait for in-flight requests (and keep-alive connections) on shutdown
LOG_FILENAME = "server.log"
STATE_FILENAME = "server.json"
SHM_STEM = "fv_triton_"  # every shm prefix we hand out starts with this
SHM_DIR = Path("/dev/shm")
CACHE_ENV = "FV_SERVING_CACHE"
EXECUTABLE_ENV = "FV_TRITONSERVER"
SYSTEM_EXECUTABLES = ("/opt/tritonserver/bin/tritonserver",)


# -- locating a server -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonInstall:
    """How to run one tritonserver: the binary, extra flags and environment it needs."""

    executable: Path
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    bundled: bool = False


def find_tritonserver(executable: str | os.PathLike[str] | None = None) -> TritonInstall:
    """The server to run: `executable`, $FV_TRITONSERVER, one on PATH or in /opt, else the bundled one."""
    chosen = executable or os.environ.get(EXECUTABLE_ENV) or shutil.which("tritonserver")
    if chosen is None:
        chosen = next((p for p in SYSTEM_EXECUTABLES if os.access(p, os.X_OK)), None)
    if chosen is not None:
        path = Path(chosen)
        if not os.access(path, os.X_OK):
            raise ServerError(f"tritonserver {path} does not exist or is not executable")
        return TritonInstall(executable=path)
    return _bundled_install(prepare_bundled_tritonserver())


def cache_root() -> Path:
    """Where fv-serving keeps prepared servers: $FV_SERVING_CACHE, else ~/.cache/fv-serving."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fv-serving"


def prepare_bundled_tritonserver(root: str | os.PathLike[str] | None = None) -> Path:
    """Copy the server bundled in nvidia-pytriton into a private folder once; return that folder.

    The wheel's tree lacks the python-backend stub in backends/python/ (it ships one per
    Python version elsewhere): without it the python backend cannot start. The copy is
    built in a temporary folder and renamed into place, so concurrent first runs are safe.
    """
    source = _pytriton_server_dir()
    version = importlib.metadata.version("nvidia-pytriton")
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = Path(root or cache_root()) / f"tritonserver-pytriton{version}-py{py}"
    if _bundle_complete(target):
        return target
    stub = source / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"nvidia-pytriton {version} has no python-backend stub for Python {py} ({stub})")
    try:
        with atomic_directory(target) as tmp:
            for part in ("bin", "backends", "caches"):
                shutil.copytree(source / part, tmp / part, symlinks=True)
            shutil.copy2(stub, tmp / "backends" / "python" / stub.name)
    except (FileExistsError, OSError):
        if not _bundle_complete(target):  # not a lost race with another process: a real failure
            raise
    return target


def _bundle_complete(folder: Path) -> bool:
    return (folder / "bin" / "tritonserver").is_file() and (
        folder / "backends" / "python" / "triton_python_backend_stub"
    ).is_file()


def _pytriton_server_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("no tritonserver found on PATH and nvidia-pytriton is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def _bundled_install(folder: Path) -> TritonInstall:
    """Flags and environment the bundled server needs (serving.md, 'what works')."""
    libs = _pytriton_server_dir().parent.parent / "nvidia_pytriton.libs"
    libpython_dir = sysconfig.get_config_var("LIBDIR") or ""
    ld_path = [p for p in (libpython_dir, str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p]
    # The stub's interpreter finds onnxruntime/numpy through the first python3 on PATH.
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    return TritonInstall(
        executable=folder / "bin" / "tritonserver",
        args=(f"--backend-directory={folder / 'backends'}", f"--cache-directory={folder / 'caches'}"),
        env=(("LD_LIBRARY_PATH", ":".join(ld_path)), ("PATH", ":".join(p for p in path if p))),
        bundled=True,
    )


# -- state of a running server -----------------------------------------------------------------------


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
        return f"http://{_url_host(self.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{_url_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_url_host(self.host)}:{self.metrics_port}/metrics"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "models": list(self.models)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerState:
        try:
            return cls(**{**data, "models": tuple(data["models"])})
        except (KeyError, TypeError) as exc:
            raise ServerError(f"server state is incomplete or has unknown fields: {exc}") from exc


def read_state(path: str | os.PathLike[str]) -> ServerState:
    """Read a state file written by `start_detached` (a run folder is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATE_FILENAME
    try:
        return ServerState.from_json(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ServerError(f"no server state at {path}: no detached server was started there") from exc
    except json.JSONDecodeError as exc:
        raise ServerError(f"server state {path} is not valid JSON: {exc}") from exc


def state_is_running(state: ServerState) -> bool:
    """Whether the process of `state` is alive and is still that server (not a reused pid)."""
    return _is_alive(state.pid) and state.shm_prefix in _cmdline(state.pid)


def start_detached(
    repository: str | os.PathLike[str],
    run_dir: str | os.PathLike[str],
    load_models: Sequence[str] | None = None,
    **kwargs: Any,
) -> ServerState:
    """Start a server that outlives this process; its state is written to `<run_dir>/server.json`.

    Keyword arguments are those of TritonServer. Stop it with `stop_from_state(run_dir)`.
    """
    server = TritonServer(repository, load_models, run_dir=run_dir, **kwargs)
    server.start()
    state = server.detach()
    write_json_atomic(Path(run_dir) / STATE_FILENAME, state.to_json())
    return state


def stop_from_state(path: str | os.PathLike[str], grace_s: float = DEFAULT_GRACE_S) -> bool:
    """Stop the detached server described by a state file; True if it was still running.

    Its shm regions are removed and the state file is deleted in any case.
    """
    state_path = Path(path) / STATE_FILENAME if Path(path).is_dir() else Path(path)
    state = read_state(state_path)
    running = state_is_running(state)
    if running:
        _terminate_group(state.pid, grace_s, child=None)
    remove_shm_regions(state.shm_prefix)
    state_path.unlink(missing_ok=True)
    return running


# -- the server --------------------------------------------------------------------------------------


class TritonServer:
    """A tritonserver process in explicit model-control mode, started on demand.

        with TritonServer(repo, load_models=["unlearned"]) as server:
            client = TritonClient(server.http_url)

    Ports are picked automatically unless given. `load_models=None` loads every model
    folder of the repository. The log goes to `<run_dir>/server.log`; a run folder
    created here is deleted again on a clean stop.
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
    ) -> None:
        self.repository = Path(repository).absolute()
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        self.models = tuple(load_models) if load_models is not None else _model_folders(self.repository)
        if not self.models:
            raise ServerError(f"model repository {self.repository} has no model folder with {CONFIG_FILENAME}")
        self.host = host
        self._requested_ports = (http_port, grpc_port, metrics_port)
        self._given_run_dir = Path(run_dir).absolute() if run_dir is not None else None
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s
        self.use_gpu = use_gpu
        self.log_verbose = log_verbose
        self._executable = executable
        self.extra_args = tuple(extra_args)

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

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server log (empty before start)."""
        return _tail(self.log_path, lines) if self._state is not None else ""

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
        _terminate_group(process.pid, self.grace_s, child=process)
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
        ports = _pick_ports(self._requested_ports, self.host)
        log_path = self._run_dir / LOG_FILENAME
        command = [str(install.executable), *self._flags(ports), *install.args, *self.extra_args]
        env = {**os.environ, **dict(install.env)}
        started = time.monotonic()
        with open(log_path, "wb") as log:
            log.write(f"# {' '.join(command)}\n".encode())
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
            _terminate_group(process.pid, grace_s=0.0, child=process)
            remove_shm_regions(self.shm_prefix)
            raise
        self.startup_s = time.monotonic() - started

    def _flags(self, ports: tuple[int, int, int]) -> list[str]:
        flags = [
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models),
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            f"--http-address={self.host}",
            f"--http-port={ports[0]}",
            f"--grpc-address={self.host}",
            f"--grpc-port={ports[1]}",
            "--allow-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={ports[2]}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={self.log_verbose}",
            "--backend-config=python,shm-default-byte-size=8388608",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if not self.use_gpu:
            flags += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        return flags

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        client = triton_http.InferenceServerClient(
            f"{_url_host(self.host)}:{self.state.http_port}", connection_timeout=2.0, network_timeout=2.0
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


def _pick_ports(requested: tuple[int | None, ...], host: str) -> tuple[int, int, int]:
    """The requested ports, free ones from the OS for the others."""
    ports = [p if p is not None else _free_port(host) for p in requested]
    while len(set(ports)) < len(ports):  # the OS handed out a duplicate: ask again
        ports = [p if r is not None else _free_port(host) for p, r in zip(ports, requested, strict=True)]
    return ports[0], ports[1], ports[2]


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host if host not in ("0.0.0.0", "::") else "", 0))
        return int(sock.getsockname()[1])


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _tail(path: Path, lines: int) -> str:
    """The last lines of a log, without Triton's wide ASCII tables (they crowd out the errors)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    kept = [line for line in text.splitlines() if not line.startswith(("|", "+-"))]
    return "\n".join(kept[-lines:])


# -- processes ---------------------------------------------------------------------------------------


def _terminate_group(pid: int, grace_s: float, child: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM the server, wait up to `grace_s`, then SIGKILL its whole process group.

    The group is killed even after a clean exit, to take python-backend stubs that
    outlived the server with it. `child` is the Popen when this process started it
    (so it is reaped rather than left as a zombie).
    """
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, grace_s, child):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _wait_exit(pid, 10.0, child)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _wait_exit(pid: int, timeout_s: float, child: subprocess.Popen[bytes] | None) -> bool:
    if child is not None:
        try:
            child.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    while _is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    _reap_if_child(pid)
    return True


def _reap_if_child(pid: int) -> None:
    """Collect the exit status of a detached server this very process started (no zombie left)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _is_alive(pid: int) -> bool:
    """Alive and not a zombie (a detached server's parent may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError):
        return ""


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is `pgid` (zombies only wait to be reaped: not counted)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError, PermissionError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


# -- shared memory -----------------------------------------------------------------------------------


def shm_regions(prefix: str) -> list[Path]:
    """The /dev/shm files whose name starts with `prefix`."""
    if not SHM_DIR.is_dir():
        return []
    return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefix))


def remove_shm_regions(prefix: str) -> list[Path]:
    """Delete the shm files of one server (by its unique prefix); return what was deleted."""
    if not prefix.startswith(SHM_STEM) or len(prefix) <= len(SHM_STEM):
        raise ServerError(f"refusing to remove shm regions for a prefix that is not ours: {prefix!r}")
    removed = []
    for path in shm_regions(prefix):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def cleanup_stale_shm() -> list[Path]:
    """Delete our shm files (any fv server) that no live process has mapped or open any more.

    They are left by servers that were killed; the python backend never reuses them.
    """
    ours = [p for p in shm_regions(SHM_STEM) if _owned_by_us(p)]
    if not ours:
        return []
    in_use = set(_shm_in_use())
    removed = []
    for path in ours:
        if str(path) not in in_use:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def _owned_by_us(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.getuid()
    except FileNotFoundError:
        return False


def _shm_in_use() -> Iterator[str]:
    """/dev/shm paths mapped or held open by any process we can inspect."""
    prefix = f"{SHM_DIR}/"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in (entry / "maps").read_text().splitlines():
                at = line.find(prefix)
                if at >= 0:
                    yield line[at:].removesuffix(" (deleted)")
        with contextlib.suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(prefix):
                        yield target
