"""The tritonserver command line, built from one settings object (in the manner of PyTriton's TritonConfig).

Every default of the server lives here, so the library, the CLI, the generated
Kubernetes manifests and the README's container command cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fv_serving.triton.control import restricted_flags

DEFAULT_HOST = "127.0.0.1"
#: Seconds to wait for the server and its models to be ready (the bundled one takes 2-3 s, a cold GPU host more).
DEFAULT_READY_TIMEOUT_S = 120.0
#: Seconds between SIGTERM and SIGKILL when stopping.
DEFAULT_GRACE_S = 15.0
#: Triton's own wait for in-flight requests (and keep-alive connections) on shutdown.
EXIT_TIMEOUT_S = 5
#: Default shared memory of each python-backend model instance (requests and responses travel through it).
PYTHON_SHM_DEFAULT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class ServerFlags:
    """Everything that decides a tritonserver's flags; `to_args_list()` renders them."""

    repository: str
    models: tuple[str, ...]
    http_port: int
    grpc_port: int
    metrics_port: int
    host: str = DEFAULT_HOST
    admin_key: str | None = None  # None: model control left OPEN (only for servers no one else can reach)
    use_gpu: bool = False
    log_verbose: int = 0
    shm_prefix: str = ""
    backend_args: tuple[str, ...] = field(default_factory=tuple)  # install-specific (bundled server's folders)
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def to_args_list(self) -> list[str]:
        flags = [
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models),
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_DEFAULT_BYTES}",
        ]
        if self.shm_prefix:
            flags.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if self.admin_key is not None:
            flags += restricted_flags(self.admin_key)
        if not self.use_gpu:
            flags += ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0"]
        return [*flags, *self.backend_args, *self.extra_args]
