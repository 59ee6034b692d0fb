"""Lifecycle of one gateway nginx: write its run dir, validate, start, reload, stop, find it again.

The run dir (GatewayConfig.run_dir) holds everything the process reads: nginx.conf,
lua/ (copies of the package's check.lua and routes.lua, so an upgrade of the package
never changes a running gateway under it), error.log, nginx.pid, tmp/, routes/ (the
live routes, routes.json: the one folder the workers write, theirs when started as
root) and gateway.json (the state another process needs to find, reload or stop it).
No secret: the admin key reaches nginx only through its environment ($FV_ADMIN_KEY,
from `admin_key` or the caller's environment, and only with an admin listener).

Routes: `route(public, upstream)` flips a public model through the admin listener
(one shared-dict write in nginx, no reload: keep-alive connections stay open);
`reload` keeps the live routes the new config still allows.

How each step is guarded:
- every config is checked with `nginx -t` before nginx sees it, and written
  atomically; a refused config leaves the running one untouched;
- start waits until the master has forked its workers (it only does after binding
  its port, so another program on the port is never mistaken for ours) and the port
  answers; otherwise the process group is killed and ServerError carries the log tail;
- reload validates, swaps nginx.conf, sends SIGHUP and waits until new workers serve
  and the old ones are gone; if nginx does not take it (a port in use...), the
  previous nginx.conf is put back and the old workers keep serving;
- stop sends SIGQUIT (graceful: in-flight requests finish), then SIGKILLs the process
  group (nginx runs in its own session, so no worker is left behind).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import signal
import subprocess
import time
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from fv_serving.atomic import write_bytes_atomic, write_json_atomic
from fv_serving.errors import InvalidInputError, ServerError
from fv_serving.gateway.config import GatewayConfig
from fv_serving.gateway.install import NginxInstall, find_nginx
from fv_serving.gateway.nginx_conf import ADMIN_KEY_ENV, LUA_FILES, render_nginx_conf
from fv_serving.gateway.routes import check_key, routes, set_route
from fv_serving.procfs import children, cmdline, file_size, group_members, is_alive, log_tail

STATE_FILENAME = "gateway.json"
OUTPUT_FILENAME = "nginx.out"  # nginx's stdout/stderr (errors before error_log is open)
DEFAULT_READY_TIMEOUT_S = 15.0
DEFAULT_GRACE_S = 10.0
_VALIDATE_TIMEOUT_S = 30.0
_PROBE_PATH = "/fv-gateway-probe"  # any path: nginx itself answers 404


class Gateway:
    """A gateway nginx in front of Triton, started on demand.

        with Gateway(config) as gateway:
            client = tritonclient.http.InferenceServerClient(gateway.url.removeprefix("http://"))

    `config.run_dir` is created if needed and kept after stop (its logs explain what
    happened). `install` defaults to `find_nginx()`. `admin_key` is the key the admin
    listener checks (default: $FV_ADMIN_KEY of this process; none or empty: the admin
    API refuses everything); it is handed to nginx in its environment only.
    """

    def __init__(
        self,
        config: GatewayConfig,
        *,
        install: NginxInstall | None = None,
        ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
        grace_s: float = DEFAULT_GRACE_S,
        admin_key: str | None = None,
    ) -> None:
        self._config = config
        self._install = install
        key = os.environ.get(ADMIN_KEY_ENV, "") if admin_key is None else admin_key
        self._admin_key = check_key(key.strip()) if key.strip() else None
        self.ready_timeout_s = ready_timeout_s
        self.grace_s = grace_s
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self.started_at: float | None = None

    # -- public API --------------------------------------------------------------------------------

    @property
    def config(self) -> GatewayConfig:
        """The config the gateway serves now (the last one start or reload applied)."""
        return self._config

    @property
    def url(self) -> str:
        return self._config.url

    @property
    def admin_url(self) -> str | None:
        """The admin listener's address (None without one)."""
        return self._config.admin_url

    @property
    def pid(self) -> int:
        """The nginx master's pid (also its process group)."""
        if self._pid is None:
            raise ServerError("the gateway is not started")
        return self._pid

    @property
    def run_dir(self) -> Path:
        return Path(self._config.run_dir)

    @property
    def install(self) -> NginxInstall:
        if self._install is None:
            self._install = find_nginx()
        return self._install

    def is_running(self) -> bool:
        """Whether our nginx master is alive (and is still ours, not a reused pid)."""
        if self._process is not None:
            return self._process.poll() is None
        return self._pid is not None and is_alive(self._pid) and self._config.conf_path in cmdline(self._pid)

    def error_log_tail(self, lines: int = 20) -> str:
        """The last lines of error.log and of nginx's own output."""
        parts = [log_tail(Path(self._config.error_log), lines), log_tail(self.run_dir / OUTPUT_FILENAME, lines)]
        return "\n".join(p for p in parts if p)

    def validate(self, config: GatewayConfig | None = None) -> None:
        """Check `config` (default: the current one) with `nginx -t`; ServerError with nginx's words if refused.

        Writes only a candidate file beside nginx.conf (and the Lua checks), never nginx.conf.
        """
        self._checked_candidate(config or self._config).unlink()

    def start(self) -> Gateway:
        """Write the run dir, validate, start nginx and wait until it serves."""
        if self._pid is not None and self.is_running():
            raise ServerError(f"the gateway is already running (pid {self._pid})")
        config = self._config
        other = _running_from(config.run_dir)
        if other is not None:
            raise ServerError(f"a gateway already runs from {config.run_dir} (pid {other}): stop it first")
        command = self.prepare()
        with open(self.run_dir / OUTPUT_FILENAME, "ab") as output:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=config.run_dir,
                env=_nginx_env(self._admin_key),
                start_new_session=True,  # own process group: stop() takes the workers with it
            )
        self._pid = self._process.pid
        self.started_at = time.time()
        try:
            self._wait_serving(config, old_workers=set())
        except BaseException:
            self._kill_group()
            raise
        write_json_atomic(self.run_dir / STATE_FILENAME, self.to_json())
        atexit.register(self.stop)
        return self

    def prepare(self) -> list[str]:
        """Write and validate the run dir (nginx.conf, Lua modules, routes folder); return the nginx command.

        What start() runs; also for an nginx that something else starts (a container's
        command), which then needs $FV_ADMIN_KEY in its environment for the admin API.
        A stored routes.json is kept: the next nginx comes back on the last routes.
        """
        config = self._config
        conf = Path(config.conf_path)
        os.replace(self._checked_candidate(config), conf)
        return [self.install.executable, "-c", str(conf), "-p", f"{config.run_dir}/", "-e", config.error_log]

    def reload(self, new_config: GatewayConfig) -> None:
        """Serve `new_config`; on any failure the previous config keeps serving.

        In-flight requests finish, but the old workers close their idle keep-alive client
        connections (a client's next request on one may fail): to move callers between
        Triton models under load, use `route`, not a reload. Live routes are kept when
        `new_config` still allows them, else its default applies.

        Raises ServerError if nginx refuses the config (nothing changed) or does not
        take it (the previous nginx.conf is restored).
        """
        if not self.is_running():
            raise ServerError("the gateway is not running: start it instead of reloading")
        if new_config.run_dir != self._config.run_dir:
            raise InvalidInputError(
                f"a reload keeps the run dir: {new_config.run_dir!r} differs from {self._config.run_dir!r}"
            )
        conf = Path(new_config.conf_path)
        candidate = self._checked_candidate(new_config, keeps_serving=True)
        previous = conf.read_bytes()
        old_workers = set(children(self.pid))
        log_offset = file_size(Path(new_config.error_log))
        os.replace(candidate, conf)
        os.kill(self.pid, signal.SIGHUP)
        try:
            self._wait_serving(new_config, old_workers=old_workers, log_offset=log_offset)
        except ServerError as exc:
            write_bytes_atomic(conf, previous)
            now = "it keeps serving the previous one" if self.is_running() else "and nginx is no longer running"
            raise ServerError(f"nginx did not take the new config; {now}: {exc}") from None
        self._config = new_config
        write_json_atomic(self.run_dir / STATE_FILENAME, self.to_json())

    def route(self, public: str, upstream: str, timeout_s: float = 10.0) -> None:
        """Route public model `public` to Triton model `upstream` now (admin API; no reload). ServerError if refused."""
        set_route(self._require_admin(), public, upstream, key=self._require_key(), timeout_s=timeout_s)

    def routes(self, timeout_s: float = 10.0) -> dict[str, str]:
        """The live routes: public model -> Triton model (admin API)."""
        return routes(self._require_admin(), key=self._require_key(), timeout_s=timeout_s)

    def _require_admin(self) -> str:
        if self._config.admin_url is None:
            raise ServerError("this gateway has no admin listener (GatewayConfig.admin_port): its routes cannot change")
        return self._config.admin_url

    def _require_key(self) -> str:
        if self._admin_key is None:
            raise ServerError(
                f"this gateway was started without an admin key (admin_key or ${ADMIN_KEY_ENV}): "
                "its admin API refuses every call"
            )
        return self._admin_key

    def stop(self) -> None:
        """SIGQUIT (graceful), then SIGKILL of the process group after `grace_s`. Idempotent."""
        atexit.unregister(self.stop)
        if self._pid is None:
            return
        if self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGQUIT)
            self._wait_exit(self.grace_s)
        self._kill_group()
        (self.run_dir / STATE_FILENAME).unlink(missing_ok=True)

    def detach(self) -> dict[str, Any]:
        """Stop managing the running nginx (it keeps serving); return the state that finds it again."""
        state = self.to_json()
        atexit.unregister(self.stop)
        self._process = None
        self._pid = None
        return state

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "started_at": self.started_at,
            "config": self._config.to_json(),
            "install": self.install.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], **kwargs: Any) -> Gateway:
        """A Gateway attached to the nginx described by `to_json()` (check `is_running()`)."""
        try:
            gateway = cls(
                GatewayConfig.from_json(data["config"]), install=NginxInstall.from_json(data["install"]), **kwargs
            )
            gateway._pid = int(data["pid"])
            gateway.started_at = data.get("started_at")
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerError(f"gateway state is incomplete: {exc}") from exc
        return gateway

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike[str], **kwargs: Any) -> Gateway:
        """The gateway whose state start() wrote into `run_dir`."""
        path = Path(run_dir) / STATE_FILENAME
        try:
            return cls.from_json(json.loads(path.read_text()), **kwargs)
        except FileNotFoundError as exc:
            raise ServerError(f"no gateway state at {path}: no gateway runs from {run_dir}") from exc
        except json.JSONDecodeError as exc:
            raise ServerError(f"gateway state {path} is not valid JSON: {exc}") from exc

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- steps -------------------------------------------------------------------------------------

    def _checked_candidate(self, config: GatewayConfig, *, keeps_serving: bool = False) -> Path:
        """`config` rendered beside nginx.conf (`nginx.conf.next`) and accepted by `nginx -t`; removed if refused."""
        candidate = Path(f"{config.conf_path}.next")
        self._write_files(config, candidate)
        try:
            self._test(candidate, config, keeps_serving=keeps_serving)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        return candidate

    def _write_files(self, config: GatewayConfig, conf: Path) -> None:
        """The run dir, the Lua modules and `conf`; readable by unprivileged workers."""
        for folder in (Path(config.run_dir), Path(config.lua_dir), Path(config.temp_dir), Path(config.routes_dir)):
            if not folder.is_dir():  # an existing folder keeps its mode (it may be private on purpose)
                folder.mkdir(parents=True)
                folder.chmod(0o755)
        _give_to_workers(Path(config.routes_dir), config.worker_user)
        package = resources.files("fv_serving.gateway")
        for filename, module in LUA_FILES.items():
            write_bytes_atomic(Path(config.lua_dir) / f"{module}.lua", package.joinpath(filename).read_bytes())
        install = self.install
        text = render_nginx_conf(config, modules=install.modules, lua_cpath=install.lua_cpath)
        write_bytes_atomic(conf, text.encode())

    def _test(self, conf: Path, config: GatewayConfig, *, keeps_serving: bool = False) -> None:
        command = [self.install.executable, "-t", "-q", "-c", str(conf), "-p", f"{config.run_dir}/"]
        command += ["-e", config.error_log]
        try:
            result = subprocess.run(
                command,
                capture_output=True,
                timeout=_VALIDATE_TIMEOUT_S,
                check=False,
                cwd=config.run_dir,
                env=_nginx_env(),
            )
        except subprocess.TimeoutExpired:
            raise ServerError(f"`nginx -t` on {conf} did not finish within {_VALIDATE_TIMEOUT_S:.0f} s") from None
        if result.returncode != 0:
            words = (result.stdout + result.stderr).decode(errors="replace").strip()
            still = "; the running gateway keeps its previous config" if keeps_serving else ""
            raise ServerError(f"nginx refused the gateway config{still}:\n{words}")

    def _wait_serving(self, config: GatewayConfig, old_workers: set[int], log_offset: int | None = None) -> None:
        """Until `config.workers` new workers run, the old ones are gone and the port answers."""
        pid = self.pid
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if not self.is_running():
                code = self._process.poll() if self._process is not None else None
                raise ServerError(
                    f"nginx exited (code {code}) before it served (log: {config.error_log}):\n{self.error_log_tail()}"
                )
            if log_offset is not None:
                failure = _new_failures(Path(config.error_log), log_offset)
                if failure:
                    raise ServerError(failure)
            workers = set(children(pid))
            new = workers - old_workers
            if len(new) >= config.workers and not (workers & old_workers) and _answers(config):
                return
            if time.monotonic() > deadline:
                if len(new) >= config.workers and _answers(config):
                    return  # old workers still finish long requests; new connections get the new config
                raise ServerError(
                    f"nginx did not serve on {config.url} within {self.ready_timeout_s:.0f} s "
                    f"(log: {config.error_log}):\n{self.error_log_tail()}"
                )
            time.sleep(0.02)

    def _wait_exit(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.is_running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the process group and reap the master."""
        pid, process = self._pid, self._process
        self._pid, self._process = None, None
        if pid is None:
            return
        # Our own child's pid cannot be reused before we reap it; for an attached gateway, signal
        # the group only if all that is left of it is nginx (a reused pid is not ours to kill).
        members = group_members(pid)
        if process is not None or all(cmdline(m).startswith("nginx: ") for m in members):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # a detached nginx this very process started
        deadline = time.monotonic() + 5.0
        while group_members(pid) and time.monotonic() < deadline:
            time.sleep(0.02)


# -- processes and files -----------------------------------------------------------------------------


def _running_from(run_dir: str) -> int | None:
    """The pid of a gateway that a state file in `run_dir` describes and that still runs."""
    try:
        other = Gateway.from_run_dir(run_dir)
    except ServerError:  # no state, or unreadable state: nothing runs from there
        return None
    return other.pid if other.is_running() else None


def _nginx_env(admin_key: str | None = None) -> dict[str, str]:
    """nginx's environment: PATH, and FV_ADMIN_KEY when there is a key.

    The master keeps the key for the workers only when nginx.conf says `env FV_ADMIN_KEY;`
    (an admin listener; also one a later reload adds); otherwise no worker sees it.

    Nothing else of ours (other credentials, LUA_PATH/LUA_CPATH that would make the
    root master load other Lua code) reaches the gateway. Its working directory is the
    run dir for the same reason: LuaJIT's default path starts with ./?.lua.
    """
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    if admin_key:
        env[ADMIN_KEY_ENV] = admin_key
    return env


def _give_to_workers(folder: Path, worker_user: tuple[str, str]) -> None:
    """Started as root, nginx's workers run as `worker_user`: the routes folder (only it) must be theirs.

    They reach it through a descriptor the master opens, so private parent folders are fine.
    """
    if os.geteuid() != 0:
        return
    import grp
    import pwd

    try:
        uid, gid = pwd.getpwnam(worker_user[0]).pw_uid, grp.getgrnam(worker_user[1]).gr_gid
    except KeyError as exc:
        raise ServerError(f"the gateway's worker_user {worker_user} does not exist on this host: {exc}") from None
    stat = folder.stat()
    if (stat.st_uid, stat.st_gid) != (uid, gid):
        os.chown(folder, uid, gid)


def _answers(config: GatewayConfig) -> bool:
    """Whether anything answers HTTP on the gateway's port (nginx itself says 404 to the probe)."""
    connection = http.client.HTTPConnection(config.client_host, config.port, timeout=1.0)
    try:
        connection.request("GET", _PROBE_PATH)
        connection.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _new_failures(log: Path, offset: int) -> str:
    """Fatal lines nginx logged after `offset` (a reload it could not apply)."""
    try:
        with open(log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    fatal = [line for line in text.splitlines() if "[emerg]" in line or "[alert]" in line]
    return "\n".join(fatal)
