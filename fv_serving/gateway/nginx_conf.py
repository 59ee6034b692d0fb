"""nginx.conf for a gateway deployment, rendered from its GatewayConfig (pure, deterministic).

What the rendered config does, and why:
- Only five routes reach Triton, each an exact-match location: GET /v2/health/live,
  GET /v2/health/ready (proxied to a URI written here), GET /v2/models/{public}
  (metadata), GET /v2/models/{public}/ready and POST /v2/models/{public}/infer. The
  latter three read the public model's live route from the shared dict per request
  (routes.lua, rewrite phase) and rewrite the URI to /v2/models/{route}/...; a
  `proxy_pass` without URI then sends exactly that rewritten URI. Whatever path
  encoding a caller tries, Triton only ever sees a URI built from this file and a
  route the config allows.
- Known Triton APIs (repository, config, statistics, shared memory, trace, logging,
  server metadata, versioned paths) answer 403; other models and paths 404. Every
  error nginx itself produces is a JSON body `{"error": "..."}`.
- The infer route runs check.lua in the access phase (the body stays in memory:
  client_body_buffer_size = client_max_body_size = the model's cap), then a plain
  proxy_pass of the rewritten request (HTTP/1.1, upstream keepalive). No client
  header is forwarded (`proxy_pass_request_headers off`): Triton cannot be told to
  decompress, restrict or forward anything by a caller.
- `proxy_next_upstream error timeout non_idempotent`: inference is idempotent, so a
  request whose replica died mid-request is retried on another one.
- Started as root, nginx runs its workers as `worker_user`; all paths are absolute
  and inside the run dir.
- With `admin_port`, a second server (the admin listener) serves GET /fv/routes and
  PUT /fv/routes/{public} (routes.lua checks the fv-admin-key header against
  $FV_ADMIN_KEY, kept by `env FV_ADMIN_KEY;`); with `admin_passthrough`, every other
  path is proxied to Triton after the same check, with the caller's headers. The
  public server has no /fv/ location at all: there it is a plain 404.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from fv_serving.errors import InvalidInputError
from fv_serving.gateway.config import MAX_BODY_CAP_BYTES, ROUTES_FILENAME, GatewayConfig, PublicModel

#: Where Debian 12's libnginx-mod-http-ndk / libnginx-mod-http-lua put their modules (load order matters).
DEBIAN_MODULES = (
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
)
#: The Lua module name of check.lua inside the run dir's lua folder.
LUA_MODULE = "fv_gateway_check"
#: The Lua module name of routes.lua (live routes, admin API).
ROUTES_MODULE = "fv_gateway_routes"
#: Package file -> Lua module name: what the run dir's lua folder holds.
LUA_FILES = {"check.lua": LUA_MODULE, "routes.lua": ROUTES_MODULE}
UPSTREAM = "fv_triton"
#: The shared dict of the live routes. Its size never changes, so nginx keeps the zone (and the
#: routes) across reloads, and old and new workers share it while a reload finishes.
ROUTES_DICT = "fv_routes"
ROUTES_DICT_SIZE = "1m"
#: The variable nginx keeps for its workers (`env`): the admin key, never written to a file.
ADMIN_KEY_ENV = "FV_ADMIN_KEY"
#: The largest body the admin passthrough takes (a model load with file overrides).
ADMIN_PASSTHROUGH_BODY_CAP = MAX_BODY_CAP_BYTES

# Bodies for the errors nginx generates itself (the Lua checks write their own).
_ERROR_MESSAGES = {
    400: "bad request",
    403: "forbidden",
    404: "not found",
    405: "method not allowed",
    408: "request timed out",
    411: "Content-Length required",
    413: "request body too large for this model",
    414: "request URI too long",
    415: "unsupported media type",
    494: "request headers too large",
    500: "internal gateway error",
    501: "not implemented",
    502: "no Triton replica answered",
    503: "service unavailable",
    504: "Triton did not answer in time",
}

# (regex, status, message) for paths that are not exposed, tried in this order.
_REFUSED_PATHS = (
    (r"^/v2/repository(/|$)", 403, "the model repository API (index, load, unload) is not exposed by this gateway"),
    (r"^/v2/(systemsharedmemory|cudasharedmemory)(/|$)", 403, "the shared-memory API is not exposed by this gateway"),
    (r"^/v2/trace(/|$)", 403, "the trace API is not exposed by this gateway"),
    (r"^/v2/logging(/|$)", 403, "the logging API is not exposed by this gateway"),
    (r"^/v2/models/stats$", 403, "statistics are not exposed by this gateway"),
    (
        r"^/v2/models/[^/]+(/versions/[^/]+)?/(config|stats|trace/setting)$",
        403,
        "model configuration, statistics and trace settings are not exposed by this gateway",
    ),
    (r"^/v2/models/[^/]+/versions(/|$)", 403, "versioned model paths are not exposed: use /v2/models/NAME/infer"),
    (r"^/v2/models/", 404, "unknown model or model API"),
    (r"^/v2/", 404, "unknown API"),
)

_GET_ONLY = "if ($request_method !~ ^(GET|HEAD)$ ) { return 405; }"
_POST_ONLY = "if ($request_method != POST) { return 405; }"


def render_nginx_conf(
    config: GatewayConfig,
    *,
    modules: Sequence[str] = DEBIAN_MODULES,
    lua_cpath: Sequence[str] = (),
) -> str:
    """The complete nginx.conf of `config`.

    `modules` are the .so files to load (ndk first, then lua); `lua_cpath` extra
    folders searched for cjson.so (LuaJIT's defaults find Debian's). Same inputs,
    same text.
    """
    for path in (*modules, *lua_cpath):
        _check_path(path)
    limits = {"models": {m.name: m.limits() for m in config.models}}
    limits_json = json.dumps(limits, sort_keys=True, separators=(",", ":"))
    routes_json = json.dumps(routes_spec(config), sort_keys=True, separators=(",", ":"))
    cpath = "".join(f"{folder}/?.so;" for folder in lua_cpath)
    lines = [
        "# Rendered by fv_serving.gateway.nginx_conf; do not edit: the gateway rewrites it on reload.",
        *(f"load_module {path};" for path in modules),
        f"user {config.worker_user[0]} {config.worker_user[1]};",
        f"worker_processes {config.workers};",
        "daemon off;",
        "master_process on;",
        f"pid {config.pid_path};",
        f"error_log {config.error_log} warn;",
        *([f"env {ADMIN_KEY_ENV};"] if config.admin_port is not None else []),
        "",
        f"events {{ worker_connections {config.worker_connections}; }}",
        "",
        "http {",
        *_indent(_http_settings(config)),
        f'    lua_package_path "{config.lua_dir}/?.lua;;";',
        *([f'    lua_package_cpath "{cpath};";'] if cpath else []),
        f"    lua_shared_dict {ROUTES_DICT} {ROUTES_DICT_SIZE};",
        "    init_by_lua_block {",
        f'        require("{LUA_MODULE}").configure([==[{limits_json}]==])',
        f'        require("{ROUTES_MODULE}").configure([==[{routes_json}]==])',
        "    }",
        "",
        f"    upstream {UPSTREAM} {{",
        *(f"        server {u} max_fails=1 fail_timeout=5s;" for u in config.upstreams),
        f"        keepalive {config.upstream_keepalive};",
        "    }",
        "",
        "    server {",
        *_indent(_server(config), 2),
        "    }",
        *(["", "    server {", *_indent(_admin_server(config), 2), "    }"] if config.admin_port is not None else []),
        "}",
    ]
    return "\n".join(lines) + "\n"


def routes_spec(config: GatewayConfig) -> dict[str, object]:
    """What routes.lua reads at config load: the dict, where routes.json lies, each model's default and routes."""
    return {
        "dict": ROUTES_DICT,
        "dir": config.routes_dir,
        "file": ROUTES_FILENAME,
        "models": {m.name: {"default": m.upstream, "allowed": list(m.allowed_routes)} for m in config.models},
    }


def _http_settings(config: GatewayConfig) -> list[str]:
    temp = config.temp_dir
    return [
        "server_tokens off;",
        "access_log off;",
        "default_type application/json;",
        "tcp_nodelay on;",
        "keepalive_timeout 30s;",
        "keepalive_requests 10000;",
        "client_header_timeout 10s;",
        "client_body_timeout 10s;",
        "send_timeout 30s;",
        "reset_timedout_connection on;",
        "client_header_buffer_size 4k;",
        "large_client_header_buffers 4 16k;",
        "client_body_buffer_size 1k;",
        f"client_body_temp_path {temp}/body;",  # nginx creates these at start even if unused
        f"proxy_temp_path {temp}/proxy;",
        f"fastcgi_temp_path {temp}/fastcgi;",
        f"uwsgi_temp_path {temp}/uwsgi;",
        f"scgi_temp_path {temp}/scgi;",
        "proxy_http_version 1.1;",
        "proxy_pass_request_headers off;",
        "proxy_connect_timeout 2s;",
        "proxy_send_timeout 30s;",
        f"proxy_read_timeout {config.read_timeout_s}s;",
        "proxy_next_upstream error timeout non_idempotent;",
        # every replica once, plus one retry: a stale keepalive connection to a single replica
        f"proxy_next_upstream_tries {len(config.upstreams) + 1};",
        "proxy_buffer_size 16k;",
        "proxy_buffers 16 32k;",
        "proxy_max_temp_file_size 0;",
        "lua_socket_log_errors off;",
    ]


def _error_pages() -> list[str]:
    lines = [f"error_page {code} @fv_error_{code};" for code in _ERROR_MESSAGES]
    for code, message in _ERROR_MESSAGES.items():
        lines += [f"location @fv_error_{code} {{ return {code} {_json_text(message)}; }}"]
    return lines


def _listen(host: str, port: int) -> str:
    return f"listen [{host}]:{port};" if ":" in host else f"listen {host}:{port};"


def _server(config: GatewayConfig) -> list[str]:
    # Refused routes answer 403/404 whatever body comes with the request (nginx discards it
    # unread); the routes to Triton set their own caps.
    largest = max(m.max_body_bytes for m in config.models)
    lines = [_listen(config.host, config.port), f"client_max_body_size {largest};", *_error_pages()]
    lines += ["", "# routes that reach Triton"]
    for path in ("/v2/health/live", "/v2/health/ready"):
        lines += _get_route(path, path)
    for model in config.models:
        lines += _model_routes(model)
    lines += [
        "",
        "# everything else",
        f"location = /v2 {{ return 403 {_json_text('server metadata is not exposed')}; }}",
    ]
    lines += [f"location = /v2/ {{ return 403 {_json_text('server metadata is not exposed')}; }}"]
    for regex, code, message in _REFUSED_PATHS:
        lines += [f'location ~ "{regex}" {{ return {code} {_json_text(message)}; }}']
    lines += [f"location / {{ return 404 {_json_text('not found')}; }}"]
    return lines


def _model_routes(model: PublicModel) -> list[str]:
    public = f"/v2/models/{model.name}"
    cap = model.max_body_bytes
    return [
        *_get_route(public, _route(model, "")),
        *_get_route(f"{public}/ready", _route(model, "/ready")),
        f"location = {public}/infer {{",
        f"    {_POST_ONLY}",
        '    set $fv_header_length "";',
        f"    client_max_body_size {cap};",
        f"    client_body_buffer_size {cap};",
        f"    {_route(model, '/infer')}",
        f'    access_by_lua_block {{ require("{LUA_MODULE}").check("{model.name}") }}',
        *_indent(_proxy_to(None, body=True)),
        "}",
    ]


def _route(model: PublicModel, suffix: str) -> str:
    """The rewrite to the live route: /v2/models/{route}{suffix}, read from the shared dict per request."""
    return f'rewrite_by_lua_block {{ require("{ROUTES_MODULE}").route("{model.name}", "{suffix}") }}'


def _get_route(public_path: str, target: str) -> list[str]:
    """`target`: a fixed upstream path, or the rewrite_by_lua line of a live route."""
    rewrite = target.startswith("rewrite_by_lua")
    return [
        f"location = {public_path} {{",
        f"    {_GET_ONLY}",
        *([f"    {target}"] if rewrite else []),
        *_indent(_proxy_to(None if rewrite else target, body=False)),
        "}",
    ]


def _proxy_to(upstream_path: str | None, *, body: bool) -> list[str]:
    """Headers are set per location: one proxy_set_header here would drop every inherited one.

    `upstream_path=None`: the URI the rewrite phase set is sent as is (proxy_pass without URI).
    """
    lines = ['set $args "";', 'proxy_set_header Connection "";']
    if body:
        lines += ["proxy_set_header Inference-Header-Content-Length $fv_header_length;"]
    else:
        lines += ["client_max_body_size 1k;", "proxy_pass_request_body off;", 'proxy_set_header Content-Length "";']
    return [*lines, f"proxy_pass http://{UPSTREAM}{upstream_path or ''};"]


def _admin_server(config: GatewayConfig) -> list[str]:
    """The admin listener: the routes API, and with admin_passthrough everything else to Triton (key checked)."""
    assert config.admin_port is not None
    module = f'require("{ROUTES_MODULE}")'
    lines = [
        _listen(config.admin_host, config.admin_port),
        "client_max_body_size 4k;",
        "client_body_buffer_size 4k;",
        *_error_pages(),
        "",
        f"location = /fv/routes {{ content_by_lua_block {{ {module}.list() }} }}",
        f"location ^~ /fv/routes/ {{ content_by_lua_block {{ {module}.put() }} }}",
        f"location ^~ /fv/ {{ return 404 {_json_text('unknown admin API: GET /fv/routes, PUT /fv/routes/NAME')}; }}",
    ]
    if not config.admin_passthrough:
        return [*lines, f"location / {{ return 404 {_json_text('not found: this admin listener serves /fv/ only')}; }}"]
    return [
        *lines,
        "# everything else goes to the one Triton, with the caller's headers (Triton checks the key too)",
        "location / {",
        f"    client_max_body_size {ADMIN_PASSTHROUGH_BODY_CAP};",
        f"    access_by_lua_block {{ {module}.authorise() }}",
        "    proxy_pass_request_headers on;",
        "    proxy_request_buffering off;",
        "    proxy_next_upstream off;",  # model control is not idempotent: never sent twice
        f"    proxy_pass http://{UPSTREAM};",
        "}",
    ]


def _json_text(message: str) -> str:
    """`{"error": message}` as an nginx single-quoted string (no variables, no escapes)."""
    text = json.dumps({"error": message})
    if any(c in text for c in "'$\\"):
        raise InvalidInputError(f"error message {message!r} cannot be written into nginx.conf")
    return f"'{text}'"


def _check_path(path: str) -> None:
    if not path.startswith("/") or any(c in path for c in " \t\n;{}'\"$#\\"):
        raise InvalidInputError(f"nginx module/lua path must be absolute without spaces or quotes, got {path!r}")


def _indent(lines: Sequence[str], levels: int = 1) -> list[str]:
    pad = "    " * levels
    return [pad + line if line else "" for line in lines]
