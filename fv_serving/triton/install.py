"""Where a real `tritonserver` comes from, and what it needs to start.

A `tritonserver` on PATH (or /opt/tritonserver/bin) when there is one, which is what
production hosts and NVIDIA's container have; otherwise the server bundled in the
nvidia-pytriton wheel, copied once into a private cache folder and completed with the
python-backend stub of the running Python (the wheel ships the stubs beside the tree,
not in it; `prepare_bundled_tritonserver` and `_bundled_install` say why each step
is needed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from fv_serving.atomic import atomic_directory
from fv_serving.errors import ServerError

CACHE_ENV = "FV_SERVING_CACHE"
EXECUTABLE_ENV = "FV_TRITONSERVER"
SYSTEM_EXECUTABLES = ("/opt/tritonserver/bin/tritonserver",)


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
