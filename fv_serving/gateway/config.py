"""What one gateway deployment is: the public models it serves, their limits, where Triton is.

Pure: no I/O, no clock. Everything here is validated when it is built, because a
value that reaches nginx.conf or the Lua checks unchecked is either a config
injection (a quote or a brace in a name) or a limit nobody meant (a body cap of
several GiB). Errors are `InvalidInputError`s naming the field, what was expected
and what was found.

The request checks need, per public model: the one input's name, datatype and dims
(batch dim excluded), the batch limit, the output names and the pixel range. A
caller reads them from the Triton config of the model it exposes
(`PublicModel.from_model_config`).

Routes: a public model is served by one Triton model at a time, chosen among the
`routes` it allows; `upstream_model` is the route a run dir starts on. The live route
is state kept by the running gateway (routes.lua, `routes.json` in the run dir) and
changed through the admin listener (`admin_port`), never by editing the config.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from fv_serving.errors import InvalidInputError

if TYPE_CHECKING:  # importing tritonclient.grpc loads grpc: only from_model_config needs it
    from tritonclient.grpc import model_config_pb2 as mc

#: Datatypes the checks can scan. FP32 is what every model of this project takes.
SUPPORTED_DATATYPES = ("FP32",)
BYTES_PER_VALUE = {"FP32": 4}
#: Room for the JSON header of an inference request (tritonclient's is ~200 bytes).
HEADER_ALLOWANCE_BYTES = 64 * 1024
#: Longest text of one value in JSON `data` that the body cap makes room for
#: (`-1.2345678901234567e-05, ` is 25 bytes; nesting brackets add < 1 byte per value).
JSON_BYTES_PER_VALUE = 32
#: A body cap beyond this is a typo or a model this gateway should not front as is.
MAX_BODY_CAP_BYTES = 1024**3
MAX_BATCH_LIMIT = 65536
MAX_RANK = 6

# Names end up inside nginx.conf (locations, upstream paths) and URLs: no quoting needed
# for this alphabet. Triton allows more, the gateway does not.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*")
# Triton paths `/v2/models/<this>` that are not models.
_RESERVED_MODEL_NAMES = frozenset({"stats"})
# A run dir is written into nginx.conf unquoted-safe: no whitespace, quotes, braces, `;`, `$`, `#`, `\`.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9_./+@%=,:-]*")
#: The live routes' file, in GatewayConfig.routes_dir.
ROUTES_FILENAME = "routes.json"


@dataclass(frozen=True)
class PublicModel:
    """One model callers may reach through the gateway, and the limits its requests must fit.

    `dims` excludes the batch dim: a request's shape must be `[N, *dims]` with
    `1 <= N <= max_batch_size`. `pixel_range=None` only requires finite values.
    `upstream_model` is the Triton model the public name is routed to when no live
    route is stored yet (default: the same name). `routes` are the Triton models it may
    be routed to at run time (through the admin API; default: only `upstream`); every
    one of them must take the same input and answer the same outputs, since the checks
    are the public model's.
    """

    name: str
    input_name: str
    dims: tuple[int, ...]
    max_batch_size: int
    outputs: tuple[str, ...]
    datatype: str = "FP32"
    pixel_range: tuple[float, float] | None = (0.0, 1.0)
    upstream_model: str | None = None
    routes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_name("PublicModel.name", self.name)
        if self.name in _RESERVED_MODEL_NAMES:
            raise InvalidInputError(f"PublicModel.name {self.name!r} is a Triton API path, not a usable model name")
        where = f"public model {self.name!r}"
        _check_name(f"{where}: input_name", self.input_name)
        if self.datatype not in SUPPORTED_DATATYPES:
            raise InvalidInputError(
                f"{where}: datatype must be one of {', '.join(SUPPORTED_DATATYPES)}, got {self.datatype!r}"
            )
        dims = tuple(self.dims) if isinstance(self.dims, (list, tuple)) else self.dims
        if not isinstance(dims, tuple) or not 1 <= len(dims) <= MAX_RANK:
            raise InvalidInputError(f"{where}: dims must be 1 to {MAX_RANK} positive ints (no batch dim), got {dims!r}")
        for dim in dims:
            _check_int(f"{where}: dims", dim, 1, 1 << 30)
        object.__setattr__(self, "dims", dims)
        _check_int(f"{where}: max_batch_size", self.max_batch_size, 1, MAX_BATCH_LIMIT)
        outputs = tuple(self.outputs) if isinstance(self.outputs, (list, tuple)) else self.outputs
        if not isinstance(outputs, tuple) or not outputs:
            raise InvalidInputError(f"{where}: outputs must name at least one output tensor, got {outputs!r}")
        for output in outputs:
            _check_name(f"{where}: output name", output)
        if len(set(outputs)) != len(outputs):
            raise InvalidInputError(f"{where}: outputs must be unique, got {list(outputs)}")
        object.__setattr__(self, "outputs", outputs)
        if self.pixel_range is not None:
            object.__setattr__(self, "pixel_range", _check_range(where, self.pixel_range))
        if self.upstream_model is not None:
            _check_name(f"{where}: upstream_model", self.upstream_model)
        routes = tuple(self.routes) if isinstance(self.routes, (list, tuple)) else self.routes
        if not isinstance(routes, tuple):
            raise InvalidInputError(f"{where}: routes must be a sequence of Triton model names, got {routes!r}")
        for route in routes:
            _check_name(f"{where}: route", route)
        if len(set(routes)) != len(routes):
            raise InvalidInputError(f"{where}: routes must be unique, got {list(routes)}")
        if routes and self.upstream not in routes:
            raise InvalidInputError(
                f"{where}: routes {list(routes)} must include the default route (upstream_model) {self.upstream!r}"
            )
        object.__setattr__(self, "routes", routes)
        if self.max_body_bytes > MAX_BODY_CAP_BYTES:
            raise InvalidInputError(
                f"{where}: a request may be {self.max_body_bytes} bytes (max_batch_size {self.max_batch_size} x "
                f"{self.values_per_item} values); the gateway keeps bodies in memory and caps them at "
                f"{MAX_BODY_CAP_BYTES} bytes: lower max_batch_size"
            )

    @property
    def upstream(self) -> str:
        """The default route: the Triton model requests go to until a live route is set."""
        return self.upstream_model or self.name

    @property
    def allowed_routes(self) -> tuple[str, ...]:
        """The Triton models this public model may be routed to (`routes`, or only `upstream`)."""
        return self.routes or (self.upstream,)

    @property
    def values_per_item(self) -> int:
        return math.prod(self.dims)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: a full batch as JSON text (binary is always smaller) plus a header."""
        per_value = max(BYTES_PER_VALUE[self.datatype], JSON_BYTES_PER_VALUE)
        return HEADER_ALLOWANCE_BYTES + self.max_batch_size * self.values_per_item * per_value

    def limits(self) -> dict[str, Any]:
        """What the Lua checks read for this model (rendered into nginx.conf)."""
        limits: dict[str, Any] = {
            "input": self.input_name,
            "datatype": self.datatype,
            "dims": list(self.dims),
            "max_batch_size": self.max_batch_size,
            "outputs": list(self.outputs),
            "max_body_bytes": self.max_body_bytes,
        }
        if self.pixel_range is not None:
            limits["pixel_range"] = list(self.pixel_range)
        return limits

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_name": self.input_name,
            "datatype": self.datatype,
            "dims": list(self.dims),
            "max_batch_size": self.max_batch_size,
            "outputs": list(self.outputs),
            "pixel_range": list(self.pixel_range) if self.pixel_range is not None else None,
            "upstream_model": self.upstream_model,
            "routes": list(self.routes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PublicModel:
        required = ("name", "input_name", "dims", "max_batch_size", "outputs")
        return cls(**_fields_of(cls, data, required))

    @classmethod
    def from_model_config(
        cls,
        config: mc.ModelConfig,
        *,
        name: str | None = None,
        pixel_range: tuple[float, float] | None = (0.0, 1.0),
        upstream_model: str | None = None,
        routes: Sequence[str] = (),
    ) -> PublicModel:
        """The public model for a Triton model config (config.pbtxt parsed into Triton's ModelConfig).

        Input name, datatype, dims and max_batch_size come from the config, outputs
        from its output list. `name` defaults to the config's name; give another one
        (with `upstream_model=config.name`) to expose it under a stable public name, and
        `routes` for the other Triton models (same input and outputs) it may be flipped to.
        """
        from fv_serving.triton.model_config import wire_type

        where = f"Triton model {config.name!r}"
        if len(config.input) != 1:
            raise InvalidInputError(
                f"{where}: the gateway fronts models with exactly one input, got {len(config.input)}"
            )
        tensor = config.input[0]
        datatype = wire_type(tensor.data_type)
        if config.max_batch_size < 1:
            raise InvalidInputError(
                f"{where}: max_batch_size is {config.max_batch_size}; the gateway needs a batching model "
                "(requests are [N, *dims])"
            )
        if any(d < 1 for d in tensor.dims):
            raise InvalidInputError(
                f"{where}: input {tensor.name!r} has variable dims {list(tensor.dims)}; the gateway needs fixed dims"
            )
        return cls(
            name=name or config.name,
            input_name=tensor.name,
            datatype=datatype,
            dims=tuple(int(d) for d in tensor.dims),
            max_batch_size=int(config.max_batch_size),
            outputs=tuple(o.name for o in config.output),
            pixel_range=pixel_range,
            upstream_model=upstream_model,
            routes=tuple(routes),
        )


@dataclass(frozen=True)
class GatewayConfig:
    """A gateway: where it listens, the Triton HTTP endpoints behind it, what it exposes.

    `upstreams` are "host:port" Triton HTTP endpoints used round-robin (a failed one is
    skipped for the request and retried later). `run_dir` holds nginx.conf, the Lua
    checks, logs, pid, temp folders and the live routes (routes/routes.json); nothing
    secret ever goes there. When nginx is started as root its workers run as
    `worker_user` (user, group).

    `admin_port` (default: none) opens the admin listener on `admin_host`: GET
    /fv/routes and PUT /fv/routes/<public>, for callers that send the `fv-admin-key`
    header equal to nginx's $FV_ADMIN_KEY. With `admin_passthrough` it also proxies
    every other path to Triton with the caller's headers (Triton's model control,
    which checks the key itself): only with one upstream, since a model-control call
    must reach the one Triton it is meant for.
    """

    host: str
    port: int
    upstreams: tuple[str, ...]
    models: tuple[PublicModel, ...]
    run_dir: str
    workers: int = 1
    worker_connections: int = 1024
    worker_user: tuple[str, str] = ("nobody", "nogroup")
    upstream_keepalive: int = 16
    read_timeout_s: int = 60
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None
    admin_passthrough: bool = False

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise InvalidInputError(
                f"GatewayConfig.host must be an IP address to listen on, got {self.host!r}"
            ) from None
        _check_int("GatewayConfig.port", self.port, 1, 65535)
        upstreams = tuple(self.upstreams) if isinstance(self.upstreams, (list, tuple)) else self.upstreams
        if not isinstance(upstreams, tuple) or not upstreams:
            raise InvalidInputError(
                f"GatewayConfig.upstreams must list at least one Triton 'host:port', got {upstreams!r}"
            )
        for upstream in upstreams:
            _check_upstream(upstream)
        if len(set(upstreams)) != len(upstreams):
            raise InvalidInputError(f"GatewayConfig.upstreams must be unique, got {list(upstreams)}")
        object.__setattr__(self, "upstreams", upstreams)
        models = tuple(self.models) if isinstance(self.models, (list, tuple)) else self.models
        if not isinstance(models, tuple) or not models or not all(isinstance(m, PublicModel) for m in models):
            raise InvalidInputError(f"GatewayConfig.models must be a non-empty sequence of PublicModel, got {models!r}")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"GatewayConfig.models: public names must be unique, got {names}")
        object.__setattr__(self, "models", models)
        run_dir = str(self.run_dir)
        if not _SAFE_PATH.fullmatch(run_dir) or "/../" in f"{run_dir}/" or "//" in run_dir:
            raise InvalidInputError(
                "GatewayConfig.run_dir must be an absolute, normalised path of letters, digits and _./+@%=,:- "
                f"(it is written into nginx.conf), got {run_dir!r}"
            )
        object.__setattr__(self, "run_dir", str(PurePosixPath(run_dir)))
        _check_int("GatewayConfig.workers", self.workers, 1, 256)
        _check_int("GatewayConfig.worker_connections", self.worker_connections, 16, 65536)
        _check_int("GatewayConfig.upstream_keepalive", self.upstream_keepalive, 1, 4096)
        _check_int("GatewayConfig.read_timeout_s", self.read_timeout_s, 1, 3600)
        user = tuple(self.worker_user) if isinstance(self.worker_user, (list, tuple)) else self.worker_user
        if not (
            isinstance(user, tuple) and len(user) == 2 and all(isinstance(u, str) and _USER.fullmatch(u) for u in user)
        ):
            raise InvalidInputError(f"GatewayConfig.worker_user must be (user, group) names, got {user!r}")
        if user[0] == "root":
            raise InvalidInputError("GatewayConfig.worker_user must not be root: workers parse hostile requests")
        object.__setattr__(self, "worker_user", user)
        self._check_admin()

    def _check_admin(self) -> None:
        try:
            ipaddress.ip_address(self.admin_host)
        except ValueError:
            raise InvalidInputError(
                f"GatewayConfig.admin_host must be an IP address to listen on, got {self.admin_host!r}"
            ) from None
        if not isinstance(self.admin_passthrough, bool):
            raise InvalidInputError(
                f"GatewayConfig.admin_passthrough must be true or false, got {self.admin_passthrough!r}"
            )
        if self.admin_port is None:
            if self.admin_passthrough:
                raise InvalidInputError("GatewayConfig.admin_passthrough needs an admin listener: set admin_port")
            return
        _check_int("GatewayConfig.admin_port", self.admin_port, 1, 65535)
        if self.admin_port == self.port:
            raise InvalidInputError(
                f"GatewayConfig.admin_port must differ from the public port {self.port}: "
                "the admin API is never served on the public listener"
            )
        if self.admin_passthrough and len(self.upstreams) != 1:
            raise InvalidInputError(
                f"GatewayConfig.admin_passthrough needs exactly one upstream, got {len(self.upstreams)} "
                f"({list(self.upstreams)}): a model-control call must reach the one Triton it is meant for"
            )

    # the run dir's layout

    @property
    def conf_path(self) -> str:
        return f"{self.run_dir}/nginx.conf"

    @property
    def lua_dir(self) -> str:
        return f"{self.run_dir}/lua"

    @property
    def temp_dir(self) -> str:
        return f"{self.run_dir}/tmp"

    @property
    def error_log(self) -> str:
        return f"{self.run_dir}/error.log"

    @property
    def pid_path(self) -> str:
        return f"{self.run_dir}/nginx.pid"

    @property
    def routes_dir(self) -> str:
        """The one folder nginx's workers write (owned by `worker_user` when started as root)."""
        return f"{self.run_dir}/routes"

    @property
    def routes_path(self) -> str:
        """The live routes, written by the gateway on every change, read when nginx (re)loads its config."""
        return f"{self.routes_dir}/{ROUTES_FILENAME}"

    @property
    def client_host(self) -> str:
        """The address a local client connects to (a wildcard listen address is reached on loopback)."""
        return _client_host(self.host)

    @property
    def url(self) -> str:
        return _url(self.client_host, self.port)

    @property
    def admin_url(self) -> str | None:
        """Where a local client reaches the admin listener (None without one)."""
        if self.admin_port is None:
            return None
        return _url(_client_host(self.admin_host), self.admin_port)

    def model(self, name: str) -> PublicModel:
        for model in self.models:
            if model.name == name:
                return model
        raise InvalidInputError(f"no public model {name!r}; this gateway serves {[m.name for m in self.models]}")

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "upstreams": list(self.upstreams),
            "models": [m.to_json() for m in self.models],
            "run_dir": self.run_dir,
            "workers": self.workers,
            "worker_connections": self.worker_connections,
            "worker_user": list(self.worker_user),
            "upstream_keepalive": self.upstream_keepalive,
            "read_timeout_s": self.read_timeout_s,
            "admin_host": self.admin_host,
            "admin_port": self.admin_port,
            "admin_passthrough": self.admin_passthrough,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GatewayConfig:
        fields = _fields_of(cls, data, ("host", "port", "upstreams", "models", "run_dir"))
        models = fields["models"]
        if not isinstance(models, list) or not all(isinstance(m, Mapping) for m in models):
            raise InvalidInputError(f"GatewayConfig.models must be a list of objects, got {models!r}")
        fields["models"] = tuple(PublicModel.from_json(m) for m in models)
        return cls(**fields)


def _client_host(host: str) -> str:
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return str(address)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


# -- validators --------------------------------------------------------------------------------------


def _check_name(what: str, value: object) -> None:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidInputError(
            f"{what} must be 1-128 letters, digits, '_', '.' or '-' starting with a letter or digit, got {value!r}"
        )


def _check_int(what: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInputError(f"{what} must be an int in [{low}, {high}], got {value!r}")


def _check_range(where: str, value: object) -> tuple[float, float]:
    if not (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise InvalidInputError(f"{where}: pixel_range must be (low, high) numbers or None, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise InvalidInputError(f"{where}: pixel_range must be finite with low < high, got {value!r}")
    return low, high


def _check_upstream(value: object) -> None:
    problem = f"GatewayConfig.upstreams entries must be 'host:port' (IPv6 as '[addr]:port'), got {value!r}"
    if not isinstance(value, str):
        raise InvalidInputError(problem)
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidInputError(problem)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidInputError(problem) from None
    elif not _HOSTNAME.fullmatch(host) or len(host) > 253:
        raise InvalidInputError(problem)


def _fields_of(cls: type, data: Mapping[str, Any], required: Sequence[str]) -> dict[str, Any]:
    """The constructor arguments in a JSON object: complete, nothing unknown, lists as tuples."""
    what = cls.__name__
    if not isinstance(data, Mapping):
        raise InvalidInputError(f"{what} JSON must be an object, got {type(data).__name__}")
    missing = [k for k in required if k not in data]
    if missing:
        raise InvalidInputError(f"{what} JSON lacks {', '.join(missing)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidInputError(f"{what} JSON has unknown fields {unknown}; known: {sorted(known)}")
    return {k: tuple(v) if isinstance(v, list) and k != "models" else v for k, v in data.items()}
