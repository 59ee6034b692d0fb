--[[
fv-serving gateway: live routes (public model -> Triton model) and the admin API that changes them.

Why routes live here and not in nginx.conf: a reload closes idle keep-alive client
connections (a client's next request on one of them fails), so a flip under load
must not reload. The route of every public model is one entry of the shared dict
`fv_routes` (one shared-memory zone for all workers); every request to a public
model's infer, metadata or ready path reads it (`route`, rewrite phase) and rewrites
its URI to that Triton model, so a change applies to the very next request on every
worker. Each worker also checks the entry against the routes its config allows.

State and persistence: the routes are written to routes.json in the routes folder of
the run dir on every change (temp file, fsync, rename, fsync of the folder), BEFORE
the shared dict flips, so what a PUT answered survives a restart of nginx or of its
container. When nginx loads its config (start or reload) `configure` takes, per
public model, the stored route if the file is valid and the config allows it, else
the config's default. The folder is opened once by the master (root, before it forks
its workers), so the workers write it through that descriptor even when a parent
folder of the run dir is private to root; they never open a path by name.

The admin API (admin listener only; nginx_conf.py never puts it on the public one):
  GET /fv/routes                   {"routes": {public: triton model}, "allowed": {public: [...]}}
  PUT /fv/routes/<public>          body {"upstream": "<triton model>"}; 200 with the new and previous
                                   route, 404 unknown public model, 409 a route the config does not
                                   allow, 400 a malformed body, 500 if routes.json cannot be written
                                   (then nothing changed)
Every admin request needs the header fv-admin-key equal to $FV_ADMIN_KEY of nginx
(`env FV_ADMIN_KEY;` in nginx.conf): 401 without it, 403 with another value, 403 for
everything when the variable is unset or empty. Changes are serialised by a lock in
the shared dict (also taken by `configure`), so routes.json and the dict never disagree.
--]]

local ffi = require "ffi"
local bit = require "bit"
local cjson_safe = require "cjson.safe"

local C = ffi.C
local bor, bxor, byte = bit.bor, bit.bxor, string.byte

local M = {}

local json = cjson_safe.new()
json.decode_max_depth(8)
json.decode_invalid_numbers(false)

local KEY_ENV = "FV_ADMIN_KEY"
local KEY_HEADER = "fv-admin-key"
local MODEL_PREFIX = "/v2/models/"
-- Shared-dict keys that are not public model names (those never start with '#').
local LOCK_KEY = "#lock"
local DIRFD_KEY = "#dirfd"
local LOCK_TTL_S = 10
local LOCK_WAIT_S = 5
local MAX_FILE_BYTES = 1024 * 1024
local FILE_MODE = 420 -- 0644: routes are not secret

for _, declaration in ipairs({
  "int open(const char *path, int flags, ...);",
  "int openat(int dirfd, const char *path, int flags, ...);",
  "int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath);",
  "int unlinkat(int dirfd, const char *path, int flags);",
  "long read(int fd, void *buf, unsigned long count);",
  "long write(int fd, const void *buf, unsigned long count);",
  "int fsync(int fd);",
  "int close(int fd);",
  "long readlink(const char *path, char *buf, unsigned long size);",
  "char *strerror(int errnum);",
  "int usleep(unsigned int usec);",
}) do
  pcall(ffi.cdef, declaration) -- already declared by another module: that declaration serves
end

-- open(2) flags: the generic Linux values, but O_DIRECTORY and O_NOFOLLOW differ by architecture.
local O_RDONLY, O_WRONLY, O_CREAT, O_TRUNC, O_NONBLOCK, O_CLOEXEC = 0, 1, 64, 512, 2048, 524288
local ARCH_FLAGS = { x64 = { 65536, 131072 }, arm64 = { 16384, 32768 } }

local dict_name, routes_dir, routes_file
local models = {} -- public name -> { default = "...", allowed = { name = true }, allowed_list = { ... } }
local names = {} -- public names, sorted
local dirfd = -1

-- -- helpers -------------------------------------------------------------------------------------------

local function errno_text()
  return ffi.string(C.strerror(ffi.errno()))
end

local function describe(value)
  if type(value) == "string" then
    if #value > 64 then
      value = value:sub(1, 64) .. "..."
    end
    return json.encode(value)
  end
  return type(value) == "table" and "an array or object" or tostring(value)
end

local function respond_json(status, payload)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Cache-Control"] = "no-store"
  ngx.print((json.encode(payload):gsub("\\/", "/"))) -- this cjson escapes every '/': undo it
  return ngx.exit(status)
end

local function respond(status, message)
  return respond_json(status, { error = message })
end

local function shared()
  local dict = ngx.shared[dict_name]
  if dict == nil then
    error("fv gateway: lua_shared_dict " .. tostring(dict_name) .. " is missing from nginx.conf")
  end
  return dict
end

-- Equal keys, in a time that does not depend on where they differ (nor on the expected key's length).
local function same_secret(given, expected)
  local a, b = ngx.sha1_bin(given), ngx.sha1_bin(expected)
  local diff = 0
  for i = 1, #a do
    diff = bor(diff, bxor(byte(a, i), byte(b, i)))
  end
  return diff == 0
end

-- -- the lock ----------------------------------------------------------------------------------------------

local lock_serial = 0

local function lock_token()
  lock_serial = lock_serial + 1
  return tostring(ngx.worker.pid()) .. ":" .. lock_serial
end

-- In a request: waits with ngx.sleep (other requests of this worker go on).
local function lock()
  local dict, token = shared(), lock_token()
  local deadline = ngx.now() + LOCK_WAIT_S
  while true do
    local ok, err = dict:safe_add(LOCK_KEY, token, LOCK_TTL_S)
    if ok then
      return token
    end
    if err ~= "exists" then
      return nil, err
    end
    if ngx.now() > deadline then
      return nil, "another route change holds the lock"
    end
    ngx.sleep(0.002)
  end
end

-- In the master, while nginx loads its config: nothing else runs there, so a short blocking wait.
local function lock_blocking()
  local dict, token = shared(), lock_token()
  for _ = 1, LOCK_WAIT_S * 1000 do
    local ok, err = dict:safe_add(LOCK_KEY, token, LOCK_TTL_S)
    if ok then
      return token
    end
    if err ~= "exists" then
      ngx.log(ngx.WARN, "fv gateway: routes lock not taken (", tostring(err), "); loading routes without it")
      return nil
    end
    C.usleep(1000)
  end
  ngx.log(ngx.WARN, "fv gateway: a route change held the lock for ", LOCK_WAIT_S, " s; loading routes without it")
  return nil
end

local function unlock(token)
  local dict = shared()
  if token ~= nil and dict:get(LOCK_KEY) == token then
    dict:delete(LOCK_KEY)
  end
end

-- -- the routes folder and file ----------------------------------------------------------------------------

local function arch_flags()
  local flags = ARCH_FLAGS[jit.arch]
  if flags == nil then
    error("fv gateway: routes persistence knows the open(2) flags of x64 and arm64 only, not " .. jit.arch)
  end
  return flags[1], flags[2] -- O_DIRECTORY, O_NOFOLLOW
end

local function fd_target(fd)
  local buffer = ffi.new("char[?]", 4096)
  local n = tonumber(C.readlink("/proc/self/fd/" .. fd, buffer, 4096))
  return n and n > 0 and ffi.string(buffer, n) or nil
end

-- The routes folder, opened once in the master; reused across reloads (a worker respawned from an
-- older cycle still holds the same descriptor number, so it is never closed while nginx runs).
local function open_routes_dir()
  local dict = shared()
  local master = tostring(ngx.worker.pid())
  local stored = dict:get(DIRFD_KEY)
  if type(stored) == "string" then
    local pid, fd = stored:match("^(%d+):(%d+)$")
    if pid == master and fd_target(tonumber(fd)) == routes_dir then
      return tonumber(fd)
    end
  end
  local O_DIRECTORY = arch_flags()
  local fd = C.open(routes_dir, bor(O_RDONLY, O_DIRECTORY, O_CLOEXEC))
  if fd < 0 then
    error("fv gateway: cannot open the routes folder " .. routes_dir .. ": " .. errno_text())
  end
  dict:safe_set(DIRFD_KEY, master .. ":" .. fd)
  return fd
end

-- The stored routes, or nil and why not (nil, nil: no file yet).
local function read_stored()
  local _, O_NOFOLLOW = arch_flags()
  local fd = C.openat(dirfd, routes_file, bor(O_RDONLY, O_NONBLOCK, O_NOFOLLOW, O_CLOEXEC))
  if fd < 0 then
    if ffi.errno() == 2 then -- ENOENT
      return nil, nil
    end
    return nil, "cannot open it: " .. errno_text()
  end
  local buffer = ffi.new("char[?]", MAX_FILE_BYTES + 1)
  local length = 0
  while length <= MAX_FILE_BYTES do
    local n = tonumber(C.read(fd, buffer + length, MAX_FILE_BYTES + 1 - length))
    if n <= 0 then
      break
    end
    length = length + n
  end
  C.close(fd)
  if length > MAX_FILE_BYTES then
    return nil, "it is larger than " .. MAX_FILE_BYTES .. " bytes"
  end
  local data = json.decode(ffi.string(buffer, length))
  if type(data) ~= "table" or type(data.routes) ~= "table" then
    return nil, 'it is not a JSON object {"routes": {...}}'
  end
  return data.routes
end

-- routes.json := `routes`, atomically and durably; true, or nil and why not.
local function persist(routes)
  local _, O_NOFOLLOW = arch_flags()
  local text = json.encode({ routes = routes, updated_at = ngx.now() }) .. "\n"
  local temp = routes_file .. "." .. ngx.worker.pid() .. ".tmp"
  local fd = C.openat(dirfd, temp, bor(O_WRONLY, O_CREAT, O_TRUNC, O_NOFOLLOW, O_CLOEXEC), ffi.new("int", FILE_MODE))
  if fd < 0 then
    return nil, "cannot create " .. routes_dir .. "/" .. temp .. ": " .. errno_text()
  end
  local written, problem = 0, nil
  while written < #text do
    local n = tonumber(C.write(fd, ffi.cast("const char *", text) + written, #text - written))
    if n <= 0 then
      problem = "cannot write " .. temp .. ": " .. errno_text()
      break
    end
    written = written + n
  end
  if problem == nil and C.fsync(fd) ~= 0 then
    problem = "cannot fsync " .. temp .. ": " .. errno_text()
  end
  C.close(fd)
  if problem == nil and C.renameat(dirfd, temp, dirfd, routes_file) ~= 0 then
    problem = "cannot rename " .. temp .. " to " .. routes_file .. ": " .. errno_text()
  end
  if problem ~= nil then
    C.unlinkat(dirfd, temp, 0)
    return nil, problem
  end
  C.fsync(dirfd) -- the rename itself; the new content is already in place for every reader
  return true
end

local function current_routes()
  local dict, routes = shared(), {}
  for _, public in ipairs(names) do
    routes[public] = dict:get(public)
  end
  return routes
end

-- -- nginx entry points ------------------------------------------------------------------------------------

-- Called once per configuration load (master process, also by `nginx -t`) with the JSON rendered into
-- nginx.conf: {"dict": ..., "dir": ..., "file": ..., "models": {public: {"default": ..., "allowed": [...]}}}.
function M.configure(text)
  local config, problem = json.decode(text)
  if type(config) ~= "table" or type(config.models) ~= "table" then
    error("fv gateway: the routes in nginx.conf are not valid: " .. tostring(problem))
  end
  dict_name, routes_dir, routes_file = config.dict, config.dir, config.file
  local loaded, sorted = {}, {}
  for public, spec in pairs(config.models) do
    local model = { default = spec.default, allowed = {}, allowed_list = spec.allowed }
    for _, name in ipairs(spec.allowed) do
      model.allowed[name] = true
    end
    loaded[public] = model
    sorted[#sorted + 1] = public
  end
  table.sort(sorted)
  models, names = loaded, sorted

  dirfd = open_routes_dir()
  local dict = shared()
  local token = lock_blocking()
  local ok, err = pcall(function()
    local stored, why = read_stored()
    if why ~= nil then
      ngx.log(ngx.WARN, "fv gateway: ignoring ", routes_dir, "/", routes_file, " (", why, "): default routes")
    end
    for _, public in ipairs(names) do
      local model = models[public]
      local route = stored and stored[public]
      if route ~= nil and not model.allowed[route] then
        ngx.log(ngx.WARN, "fv gateway: stored route ", public, " -> ", describe(route),
          " is not allowed by the config; using ", model.default)
        route = nil
      end
      local set, problem = dict:safe_set(public, route or model.default)
      if not set then
        error("fv gateway: cannot store the route of " .. public .. ": " .. tostring(problem))
      end
    end
  end)
  unlock(token)
  if not ok then
    error(err, 0)
  end
end

-- rewrite_by_lua entry of a public model's routes: the URI becomes /v2/models/<route><suffix>.
function M.route(public, suffix)
  local model = models[public]
  local upstream = shared():get(public)
  if model == nil or upstream == nil then
    ngx.log(ngx.ERR, "fv gateway: no route for public model ", public)
    return respond(503, "no route for this model")
  end
  if not model.allowed[upstream] then
    -- a reload changed the allowed routes while this (old) worker finishes its requests
    ngx.log(ngx.WARN, "fv gateway: route ", public, " -> ", upstream, " not allowed here; using ", model.default)
    upstream = model.default
  end
  ngx.req.set_uri(MODEL_PREFIX .. upstream .. suffix, false)
end

-- Returns if the caller sent the admin key; otherwise answers 401/403 JSON (and does not return).
function M.authorise()
  local expected = os.getenv(KEY_ENV)
  if expected == nil or expected == "" then
    return respond(403, "the admin API is disabled: " .. KEY_ENV .. " is not set for the gateway")
  end
  local headers, truncated = ngx.req.get_headers(64)
  if truncated then
    return respond(400, "too many request headers")
  end
  local given = headers[KEY_HEADER]
  if given == nil or given == "" then
    return respond(401, "the admin API needs the " .. KEY_HEADER .. " header")
  end
  if type(given) ~= "string" then
    return respond(401, "send the " .. KEY_HEADER .. " header once")
  end
  if not same_secret(given, expected) then
    ngx.log(ngx.WARN, "fv gateway admin: wrong ", KEY_HEADER, " from ", ngx.var.remote_addr)
    return respond(403, "wrong " .. KEY_HEADER)
  end
end

-- GET /fv/routes
function M.list()
  M.authorise()
  local method = ngx.req.get_method()
  if method ~= "GET" and method ~= "HEAD" then
    ngx.header["Allow"] = "GET"
    return respond(405, "GET /fv/routes lists the routes; PUT /fv/routes/<public model> changes one")
  end
  local allowed = {}
  for _, public in ipairs(names) do
    allowed[public] = models[public].allowed_list
  end
  return respond_json(200, { routes = current_routes(), allowed = allowed })
end

-- PUT /fv/routes/<public>
function M.put()
  M.authorise()
  if ngx.req.get_method() ~= "PUT" then
    ngx.header["Allow"] = "PUT"
    return respond(405, 'send PUT /fv/routes/<public model> with {"upstream": "<triton model>"}')
  end
  local public = ngx.var.uri:match("^/fv/routes/([A-Za-z0-9][A-Za-z0-9_.-]*)$")
  local model = public and models[public]
  if model == nil then
    return respond(404, "no public model " .. describe(ngx.var.uri:sub(#"/fv/routes/" + 1)) ..
      "; this gateway serves " .. table.concat(names, ", "))
  end
  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body == nil then
    if ngx.req.get_body_file() ~= nil then
      return respond(413, "request body too large")
    end
    return respond(400, 'send {"upstream": "<triton model>"}')
  end
  local request = json.decode(body)
  if type(request) ~= "table" or type(request.upstream) ~= "string" then
    return respond(400, 'the body must be a JSON object {"upstream": "<triton model>"}')
  end
  for key in pairs(request) do
    if key ~= "upstream" then
      return respond(400, "the body has field " .. describe(key) .. '; only "upstream" is accepted')
    end
  end
  local upstream = request.upstream
  if not model.allowed[upstream] then
    return respond(409, "route " .. public .. " -> " .. describe(upstream) .. " is not allowed; allowed: " ..
      table.concat(model.allowed_list, ", "))
  end

  local token, why = lock()
  if token == nil then
    return respond(503, "the route was not changed: " .. tostring(why) .. "; try again")
  end
  local ok, previous, routes, problem = pcall(function()
    local routes = current_routes()
    local before = routes[public]
    routes[public] = upstream
    local written, err = persist(routes) -- first the file: a restart never undoes an answered change
    if not written then
      return before, nil, err
    end
    local set, err2 = shared():safe_set(public, upstream)
    if not set then
      return before, nil, "cannot store the route: " .. tostring(err2)
    end
    return before, routes
  end)
  unlock(token)
  if not ok then
    ngx.log(ngx.ERR, "fv gateway admin: route change failed: ", tostring(previous))
    return respond(500, "internal gateway error")
  end
  if routes == nil then
    ngx.log(ngx.ERR, "fv gateway admin: route ", public, " -> ", upstream, " not changed: ", problem)
    return respond(500, "the route was not changed: " .. problem)
  end
  ngx.log(ngx.NOTICE, "fv gateway admin: route ", public, " -> ", upstream, " (was ", tostring(previous), ")")
  return respond_json(200, { public = public, upstream = upstream, previous = previous, routes = routes })
end

return M
