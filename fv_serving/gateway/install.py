"""Finding the nginx the gateway runs: the binary, the Lua modules and the Lua libraries they load.

The gateway is Debian's nginx with OpenResty's Lua module (LuaJIT) and lua-cjson. A
missing piece would otherwise show up as an nginx error at start-up ("unknown
directive access_by_lua_block", "module 'cjson.safe' not found"); here it is one
line naming the Debian packages to install.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fv_serving.errors import ServerError

APT_PACKAGES = "nginx-light libnginx-mod-http-lua lua-cjson"
EXECUTABLE_ENV = "FV_NGINX"
SYSTEM_EXECUTABLES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/lib64/nginx/modules", "/usr/share/nginx/modules")
#: Load order matters: the Lua module needs the Nginx Development Kit loaded first.
MODULE_FILES = ("ndk_http_module.so", "ngx_http_lua_module.so")
_MULTIARCH = sysconfig.get_config_var("MULTIARCH") or ""
#: LuaJIT's default cpath on Debian includes the multiarch folder; the others are searched explicitly.
LUA_CPATH_DIRS = tuple(
    d
    for d in (f"/usr/lib/{_MULTIARCH}/lua/5.1" if _MULTIARCH else "", "/usr/local/lib/lua/5.1", "/usr/lib64/lua/5.1")
    if d
)
#: lua-resty-core: the Lua module refuses to start without it (a dependency of libnginx-mod-http-lua).
RESTY_CORE_FILES = ("/usr/share/lua/5.1/resty/core.lua", "/usr/local/share/lua/5.1/resty/core.lua")


@dataclass(frozen=True)
class NginxInstall:
    """An nginx able to run the gateway: the binary, the modules to load, where cjson.so lies."""

    executable: str
    modules: tuple[str, ...]
    lua_cpath: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"executable": self.executable, "modules": list(self.modules), "lua_cpath": list(self.lua_cpath)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NginxInstall:
        try:
            return cls(str(data["executable"]), tuple(data["modules"]), tuple(data.get("lua_cpath", ())))
        except (KeyError, TypeError) as exc:
            raise ServerError(f"gateway install state is incomplete: {exc}") from exc


def find_nginx(
    executable: str | os.PathLike[str] | None = None,
    modules_dir: str | os.PathLike[str] | None = None,
) -> NginxInstall:
    """The nginx to run: `executable`, $FV_NGINX, one on PATH or in /usr/sbin; modules from `modules_dir` or Debian's.

    Raises ServerError naming everything missing and the packages to install.
    """
    missing: list[str] = []
    binary = _executable(executable)
    if binary is None:
        missing.append(f"nginx ({executable})" if executable else "nginx")
    folders = (str(modules_dir),) if modules_dir is not None else MODULE_DIRS
    modules = []
    for name in MODULE_FILES:
        found = next((f"{d}/{name}" for d in folders if Path(d, name).is_file()), None)
        if found is None:
            missing.append(f"{name} (in {' or '.join(folders)})")
        else:
            modules.append(found)
    cjson = next((d for d in LUA_CPATH_DIRS if Path(d, "cjson.so").is_file()), None)
    if cjson is None:
        missing.append("cjson.so (lua-cjson)")
    if not any(Path(p).is_file() for p in RESTY_CORE_FILES):
        missing.append("resty/core.lua (lua-resty-core)")
    if missing or binary is None or cjson is None:
        raise ServerError(
            f"the gateway needs nginx with the Lua module and lua-cjson; missing: {', '.join(missing)}. "
            f"Install them with `apt-get install {APT_PACKAGES}`"
        )
    return NginxInstall(executable=binary, modules=tuple(modules), lua_cpath=(cjson,))


def _executable(given: str | os.PathLike[str] | None) -> str | None:
    chosen = given or os.environ.get(EXECUTABLE_ENV)
    if chosen:
        path = Path(chosen)
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    on_path = shutil.which("nginx")
    if on_path:
        return on_path
    return next((p for p in SYSTEM_EXECUTABLES if os.access(p, os.X_OK)), None)
