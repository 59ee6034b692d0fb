"""The public face of a Triton deployment: nginx + Lua request checks in front of Triton on loopback.

Triton's HTTP frontend is not safe for hostile callers (bundled 2.51, measured: one
request with an absurd declared shape aborts the server, every loaded model and the
admin APIs are callable, NaN inputs yield invalid JSON). The gateway listens on the
public address and lets through only health, metadata, readiness and checked
inference requests for the public models; Triton listens on loopback only.

- `config`: what a deployment is (PublicModel, GatewayConfig), pure and validated.
- `nginx_conf`: the nginx.conf of a config (pure).
- `check.lua`: the request checks nginx runs (package data).
- `routes.lua`: the live routes (public model -> Triton model, a shared dict read per
  request, persisted in the run dir's routes.json) and the admin API that flips them.
- `routes`: callers of that admin API (`set_route`, `routes`).
- `install`: finding nginx, its Lua module and lua-cjson.
- `process`: the nginx process (start, reload, stop, find again, `route`).

Needs Debian's `nginx-light libnginx-mod-http-lua lua-cjson`.
"""

from fv_serving.gateway.config import GatewayConfig, PublicModel
from fv_serving.gateway.install import NginxInstall, find_nginx
from fv_serving.gateway.nginx_conf import render_nginx_conf
from fv_serving.gateway.process import Gateway
from fv_serving.gateway.routes import routes, set_route

__all__ = [
    "Gateway",
    "GatewayConfig",
    "NginxInstall",
    "PublicModel",
    "find_nginx",
    "render_nginx_conf",
    "routes",
    "set_route",
]
