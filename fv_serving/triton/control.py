"""The model-control key: who may load, unload, configure or inspect the models of a running server.

Triton's model-repository API can load python-backend code (a `load_model` with a
file override runs as the server's user), unload the classifier under the ensemble
or replace the live forget step. So `fv serve` starts Triton with these API groups
restricted to callers that send a per-deployment key, over HTTP and gRPC:

  model-repository  load/unload/index: code execution and replacing what serves
  model-config      internals of every model (names of the bypass models, file names)
  shared-memory     registering a region makes Triton read and write memory it maps
  statistics        per-model traffic: operator data, not a client's business
  trace, logging    settings that make the server write files where it is told

Health, metadata and inference stay open (clients need them; the gateway narrows
them to the public models). The key is generated once per deployment and kept in the
server's run folder (0700) as `admin.key` (0600): never printed, never in the
repository (which other users may read), never in git. `fv switch` and `fv status`
read it from there; for a server started elsewhere, pass it with $FV_ADMIN_KEY or
--admin-key-file. Limit, stated in the README: Triton takes the key on its command
line, which other local users can read in /proc unless it is mounted hidepid=2;
on shared hosts run Triton in its own container or pod (the Kubernetes manifests do).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fv_serving.atomic import atomic_path
from fv_serving.errors import InvalidInputError, ServerError

ADMIN_HEADER = "fv-admin-key"
#: Triton's gRPC frontend checks restricted protocols against this metadata key.
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
RESTRICTED_APIS = ("model-repository", "model-config", "shared-memory", "statistics", "trace", "logging")
KEY_FILENAME = "admin.key"
KEY_ENV = "FV_ADMIN_KEY"


def restricted_flags(key: str) -> list[str]:
    """tritonserver flags that lock RESTRICTED_APIS behind the key (2.51 wants group:header=value)."""
    groups = ",".join(RESTRICTED_APIS)
    return [
        f"--http-restricted-api={groups}:{ADMIN_HEADER}={key}",
        f"--grpc-restricted-protocol={groups}:{ADMIN_HEADER}={key}",
    ]


def private_folder(path: str | os.PathLike[str]) -> Path:
    """Create (or tighten) a folder only its owner can enter."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    return folder


def ensure_key(run_dir: str | os.PathLike[str]) -> str:
    """The deployment's key, generated on first use (stable across restarts, so operator tools keep working)."""
    path = private_folder(run_dir) / KEY_FILENAME
    existing = read_key_file(path) if path.exists() else None
    if existing:
        return existing
    key = secrets.token_urlsafe(32)
    with atomic_path(path) as tmp:
        tmp.write_text(key + "\n")
        tmp.chmod(0o600)
    path.chmod(0o600)
    return key


def read_key_file(path: str | os.PathLike[str]) -> str:
    """A key file's content; refused when others may read it (a leaked key is no key)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as exc:
        raise ServerError(f"cannot read the model-control key {path}: {exc}") from exc
    if mode & 0o077:
        raise InvalidInputError(f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it first")
    if not text:
        raise InvalidInputError(f"{path} is empty")
    return text


def find_key(
    run_dir: str | os.PathLike[str] | None = None, key_file: str | os.PathLike[str] | None = None
) -> str | None:
    """The key for a deployment: --admin-key-file, then $FV_ADMIN_KEY, then the run folder's; None if none."""
    if key_file is not None:
        return read_key_file(key_file)
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].strip()
    if run_dir is not None and (Path(run_dir) / KEY_FILENAME).is_file():
        return read_key_file(Path(run_dir) / KEY_FILENAME)
    return None
