--[[
fv-serving gateway: the checks on POST /v2/models/{public}/infer, run by nginx
(access_by_lua) before a plain proxy_pass to Triton.

Why each check exists (bundled Triton 2.51, measured): one JSON request whose
declared shape is absurd aborts the whole server; NaN/Inf inputs are answered with
invalid JSON; shared-memory parameters make Triton read server memory; a gzip body is
decompressed by Triton (a bomb). So a request passes only if it is exactly what the
public model takes: one input of the right name, datatype and shape [N, *dims]
(1 <= N <= max_batch_size), N * prod(dims) finite values inside the pixel range,
known outputs, and no parameter beyond the binary-data ones.

What reaches Triton is never the caller's JSON: the checked request is written anew
(a canonical JSON header with only the checked fields, then the tensor as raw FP32
bytes, converted from JSON `data` when it came as JSON). Two JSON parsers never
disagree about duplicate keys, odd numbers or unknown fields when only one of them
reads the caller's text. Client headers are not forwarded either (nginx.conf).

Limits per model are rendered into nginx.conf by fv_serving/gateway/nginx_conf.py
and handed to `configure` once, in the master process, when nginx loads its config.
--]]

local ffi = require "ffi"
local cjson_safe = require "cjson.safe"

local M = {}

local json = cjson_safe.new()
json.decode_invalid_numbers(false) -- NaN, Infinity, hex numbers: not JSON
json.decode_max_depth(16) -- request object > inputs > input > data > rank nesting
json.encode_invalid_numbers(false)

local FLT_MAX = 3.4028234663852886e38
local INF = math.huge
local floor = math.floor
local char_ptr = ffi.typeof("const char *")
local float_ptr = ffi.typeof("const float *")
local float_array = ffi.typeof("float[?]")

local REQUEST_KEYS = { id = true, inputs = true, outputs = true, parameters = true }
local INPUT_KEYS = { name = true, datatype = true, shape = true, data = true, parameters = true }
local OUTPUT_KEYS = { name = true, parameters = true }
local MAX_ID_LENGTH = 256

local models = {}

-- Refusals travel as errors so that every check reads as one line; `check` answers them.
local Refusal = {}
Refusal.__index = Refusal

local function refuse(status, message)
  error(setmetatable({ status = status, message = message }, Refusal), 0)
end

local function bad(message)
  refuse(400, message)
end

-- A caller's value, made short and safe to quote in a message.
local function describe(value)
  local kind = type(value)
  if kind == "string" then
    if #value > 64 then
      value = value:sub(1, 64) .. "..."
    end
    return json.encode(value)
  elseif kind == "number" then
    return string.format("%.9g", value)
  elseif value == cjson_safe.null then
    return "null"
  end
  return kind == "table" and "an array or object" or kind
end

local function describe_list(list)
  local parts = {}
  for i = 1, math.min(#list, 8) do
    parts[i] = describe(list[i])
  end
  if #list > 8 then
    parts[#parts + 1] = "..."
  end
  return "[" .. table.concat(parts, ",") .. "]"
end

local function is_integer(value)
  return type(value) == "number" and value == floor(value) and value >= 0 and value < 2 ^ 53
end

local function only_keys(object, allowed, what)
  if type(object) ~= "table" then
    bad(what .. " must be a JSON object, got " .. describe(object))
  end
  if #object > 0 then
    bad(what .. " must be a JSON object, got an array")
  end
  for key in pairs(object) do
    if not allowed[key] then
      local names = {}
      for name in pairs(allowed) do
        names[#names + 1] = name
      end
      table.sort(names)
      bad(what .. " has field " .. describe(key) .. ", which is not accepted (allowed: " .. table.concat(names, ", ") .. ")")
    end
  end
end

local function array_of(value, what)
  if value ~= nil and type(value) ~= "table" then
    bad(what .. " must be a JSON array, got " .. describe(value))
  end
  if value ~= nil and #value == 0 and next(value) ~= nil then
    bad(what .. " must be a JSON array, got an object")
  end
  return value
end

-- -- values ------------------------------------------------------------------------------------------

local function format_value(value)
  if value == floor(value) and math.abs(value) < 1e15 then
    return string.format("%.1f", value)
  end
  return string.format("%.9g", value)
end

-- Called with the first value outside [low, high]: say which problem it is.
local function refuse_value(model, value, index)
  local where = string.format("input '%s' at flat index %d", model.input, index)
  if value ~= value then
    bad(where .. " is NaN: send finite numbers")
  end
  if value == INF or value == -INF then
    bad(where .. " is " .. (value > 0 and "+" or "-") .. "Inf (or beyond FP32's range): send finite numbers")
  end
  if model.pixel_range then
    local low, high = model.low, model.high
    local hint = ""
    if low == 0 and high == 1 and value > 1 and value <= 255 then
      hint = " (send x/255)"
    end
    bad(string.format("pixel values must be in [%.9g,%.9g]: got %s at flat index %d%s", low, high,
      format_value(value), index, hint))
  end
  bad(where .. " is " .. format_value(value) .. ", beyond FP32's range")
end

-- FP32 tensor bytes at body[offset + 1 ...]: every value finite and inside the range.
-- `not (v >= low and v <= high)` is also true for NaN, so one comparison pair covers all.
local function scan_binary(model, body, offset, count)
  local values = ffi.cast(float_ptr, ffi.cast(char_ptr, body) + offset)
  local low, high = model.low, model.high
  for j = 0, count - 1 do
    local v = values[j]
    if not (v >= low and v <= high) then
      refuse_value(model, v, j)
    end
  end
end

-- Flatten JSON `data` (flat or nested row-major, as Triton accepts) into an FP32 buffer.
-- Nesting is bounded by the tensor's rank; the range is checked on the FP32 value Triton would see.
local function flatten(model, array, depth, max_depth, buffer, filled, count)
  local low, high = model.low, model.high
  for i = 1, #array do
    local v = array[i]
    if type(v) == "number" then
      if filled >= count then
        bad(string.format("input '%s' data holds more than the %d values its shape needs", model.input, count))
      end
      buffer[filled] = v
      local f = buffer[filled]
      if not (f >= low and f <= high) then
        refuse_value(model, f, filled)
      end
      filled = filled + 1
    elseif type(v) == "table" and depth < max_depth then
      if #v == 0 then
        bad(string.format("input '%s' data holds an empty array or an object", model.input))
      end
      filled = flatten(model, v, depth + 1, max_depth, buffer, filled, count)
    elseif type(v) == "table" then
      bad(string.format("input '%s' data is nested deeper than its shape (rank %d)", model.input, max_depth))
    else
      bad(string.format("input '%s' data must hold only numbers, found %s", model.input, describe(v)))
    end
  end
  return filled
end

local function json_tensor(model, data, count, rank)
  if type(data) ~= "table" or #data == 0 then
    bad(string.format("input '%s' data must be a non-empty JSON array of numbers, got %s", model.input, describe(data)))
  end
  local buffer = float_array(count)
  local filled = flatten(model, data, 1, rank, buffer, 0, count)
  if filled ~= count then
    bad(string.format("input '%s' data holds %d values but its shape needs %d", model.input, filled, count))
  end
  return ffi.string(buffer, count * 4)
end

-- -- the request -------------------------------------------------------------------------------------

local function read_header_length(headers, body_length)
  local declared = headers["inference-header-content-length"]
  if declared == nil then
    return body_length
  end
  if type(declared) ~= "string" or not declared:match("^%d+$") or #declared > 10 then
    bad("Inference-Header-Content-Length must be one non-negative integer, got " ..
      (type(declared) == "table" and "several values" or describe(declared)))
  end
  local length = tonumber(declared)
  if length > body_length then
    bad(string.format("Inference-Header-Content-Length is %d but the body has only %d bytes", length, body_length))
  end
  if length == 0 then
    bad("Inference-Header-Content-Length is 0: the JSON header must come first")
  end
  return length
end

local function checked_shape(model, shape)
  local rank = #model.dims + 1
  local expected = "[N," .. table.concat(model.dims, ",") .. "] with 1 <= N <= " .. model.max_batch_size
  if type(shape) ~= "table" or #shape ~= rank then
    bad(string.format("input '%s' shape must be %s, got %s", model.input, expected,
      type(shape) == "table" and describe_list(shape) or describe(shape)))
  end
  for i = 1, rank do
    local d = shape[i]
    local fits = is_integer(d) and (i == 1 and d >= 1 and d <= model.max_batch_size or d == model.dims[i - 1])
    if not fits then
      bad(string.format("input '%s' shape must be %s, got %s", model.input, expected, describe_list(shape)))
    end
  end
  local canonical = { shape[1] }
  for i = 1, #model.dims do
    canonical[i + 1] = model.dims[i]
  end
  return canonical
end

local function checked_outputs(model, outputs)
  array_of(outputs, "outputs")
  if outputs == nil or #outputs == 0 then
    return nil -- Triton then returns every output
  end
  local canonical, seen = {}, {}
  for i = 1, #outputs do
    local output = outputs[i]
    only_keys(output, OUTPUT_KEYS, "outputs[" .. (i - 1) .. "]")
    local name = output.name
    if type(name) ~= "string" or not model.output_set[name] then
      bad("unknown output " .. describe(name) .. ": this model has " .. table.concat(model.outputs, ", "))
    end
    if seen[name] then
      bad("output '" .. name .. "' is requested twice")
    end
    seen[name] = true
    local entry = { name = name }
    if output.parameters ~= nil then
      only_keys(output.parameters, { binary_data = true }, "parameters of output '" .. name .. "'")
      local binary = output.parameters.binary_data
      if type(binary) ~= "boolean" then
        bad("parameter binary_data of output '" .. name .. "' must be true or false, got " .. describe(binary))
      end
      entry.parameters = { binary_data = binary }
    end
    canonical[i] = entry
  end
  return canonical
end

-- The checked request as Triton will receive it: canonical JSON header + raw FP32 bytes.
local function inspect(model)
  local headers, truncated = ngx.req.get_headers(64)
  if truncated then
    bad("too many request headers")
  end
  local encoding = headers["content-encoding"]
  if encoding ~= nil and (type(encoding) ~= "string" or encoding:lower() ~= "identity") then
    refuse(415, "Content-Encoding " .. (type(encoding) == "table" and "with several values" or describe(encoding)) ..
      " is not accepted: send the body uncompressed")
  end

  ngx.req.read_body()
  local body = ngx.req.get_body_data()
  if body == nil then
    if ngx.req.get_body_file() ~= nil then
      refuse(413, "request body too large")
    end
    bad("the request has no body: send an inference request (a JSON header, then binary tensor data if declared)")
  end
  if #body > model.max_body_bytes then
    refuse(413, string.format("request body too large: %d bytes, at most %d", #body, model.max_body_bytes))
  end

  local header_length = read_header_length(headers, #body)
  local text = header_length == #body and body or body:sub(1, header_length)
  if text:find("\0", 1, true) then -- cjson stops reading at a NUL byte; valid JSON never has one
    bad("the inference header is not valid JSON: it contains a NUL byte")
  end
  local request, problem = json.decode(text)
  if request == nil then
    bad("the inference header is not valid JSON: " .. problem)
  end
  only_keys(request, REQUEST_KEYS, "the request")

  local id = request.id
  if id ~= nil and (type(id) ~= "string" or #id > MAX_ID_LENGTH) then
    bad("request id must be a string of at most " .. MAX_ID_LENGTH .. " characters")
  end
  local parameters
  if request.parameters ~= nil then
    only_keys(request.parameters, { binary_data_output = true }, "request parameters")
    local binary = request.parameters.binary_data_output
    if type(binary) ~= "boolean" then
      bad("request parameter binary_data_output must be true or false, got " .. describe(binary))
    end
    parameters = { binary_data_output = binary }
  end

  local inputs = array_of(request.inputs, "inputs")
  if inputs == nil or #inputs ~= 1 then
    bad(string.format("the request must have exactly one input, '%s'; got %d", model.input, inputs and #inputs or 0))
  end
  local input = inputs[1]
  only_keys(input, INPUT_KEYS, "input")
  if input.name ~= model.input then
    bad(string.format("unknown input %s: this model takes one input, '%s'", describe(input.name), model.input))
  end
  if input.datatype ~= model.datatype then
    bad(string.format("input '%s' datatype must be %s, got %s", model.input, model.datatype, describe(input.datatype)))
  end
  local shape = checked_shape(model, input.shape)
  local count = shape[1] * model.values_per_item
  local size = count * 4

  local binary_size
  if input.parameters ~= nil then
    only_keys(input.parameters, { binary_data_size = true }, "parameters of input '" .. model.input .. "'")
    binary_size = input.parameters.binary_data_size
    if not is_integer(binary_size) then
      bad("binary_data_size of input '" .. model.input .. "' must be a non-negative integer, got " .. describe(binary_size))
    end
  end
  local trailing = #body - header_length
  local tensor
  if binary_size ~= nil then
    if input.data ~= nil then
      bad(string.format("input '%s' has both data and binary_data_size: send one", model.input))
    end
    if binary_size ~= size then
      bad(string.format("binary_data_size of input '%s' is %d but shape %s of %s needs %d bytes", model.input,
        binary_size, describe_list(shape), model.datatype, size))
    end
    if trailing ~= size then
      bad(string.format("%d bytes follow the JSON header but binary_data_size says %d", trailing, binary_size))
    end
    scan_binary(model, body, header_length, count)
    tensor = body:sub(header_length + 1)
  else
    if trailing ~= 0 then
      bad(string.format("%d bytes follow the JSON header but no input declares binary_data_size", trailing))
    end
    if input.data == nil then
      bad(string.format("input '%s' has neither data nor binary_data_size", model.input))
    end
    tensor = json_tensor(model, input.data, count, #shape)
  end

  local canonical = {
    inputs = { {
      name = model.input,
      datatype = model.datatype,
      shape = shape,
      parameters = { binary_data_size = size },
    } },
    outputs = checked_outputs(model, request.outputs),
    parameters = parameters,
    id = id,
  }
  local header = json.encode(canonical)
  ngx.req.set_body_data(header .. tensor)
  ngx.var.fv_header_length = tostring(#header)
end

-- -- entry points ------------------------------------------------------------------------------------

local function respond(status, message)
  ngx.status = status
  ngx.header["Content-Type"] = "application/json"
  ngx.print(json.encode({ error = message }))
  return ngx.exit(status)
end

-- Called once per configuration load (master process) with the JSON rendered into nginx.conf.
function M.configure(text)
  local config, problem = json.decode(text)
  if type(config) ~= "table" or type(config.models) ~= "table" then
    error("fv gateway: the model limits in nginx.conf are not valid: " .. tostring(problem))
  end
  local loaded = {}
  for name, limits in pairs(config.models) do
    local model = {
      input = limits.input,
      datatype = limits.datatype,
      dims = limits.dims,
      max_batch_size = limits.max_batch_size,
      outputs = limits.outputs,
      output_set = {},
      max_body_bytes = limits.max_body_bytes,
      values_per_item = 1,
      pixel_range = type(limits.pixel_range) == "table",
      low = -FLT_MAX,
      high = FLT_MAX,
    }
    for _, d in ipairs(model.dims) do
      model.values_per_item = model.values_per_item * d
    end
    for _, output in ipairs(model.outputs) do
      model.output_set[output] = true
    end
    if model.pixel_range then
      model.low, model.high = limits.pixel_range[1], limits.pixel_range[2]
    end
    loaded[name] = model
  end
  models = loaded
end

-- access_by_lua entry: returns to let nginx proxy the rewritten request, or answers 4xx JSON.
function M.check(public)
  local model = models[public]
  if model == nil then
    ngx.log(ngx.ERR, "fv gateway: no limits for public model ", public)
    return respond(500, "gateway misconfigured")
  end
  local ok, err = pcall(inspect, model)
  if ok then
    return
  end
  if getmetatable(err) == Refusal then
    return respond(err.status, err.message)
  end
  ngx.log(ngx.ERR, "fv gateway: check failed: ", tostring(err))
  return respond(500, "internal gateway error")
end

return M
