-- wrk script for the soak (bench/stress.py): every connection cycles through a fixed schedule of request kinds
-- (cache hits, misses, batches, CSV, each protocol, metadata, probes, admin reads, feedback and the errors a
-- service meets: bad rows, bad JSON, wrong keys, unknown models and paths, a missing role), built for the iris
-- demo model. Arguments (after `--`): seed user key admin-user admin-key.
-- Fixed requests are formatted once in init(); misses and batches draw rows from per-thread pools of
-- pre-formatted numbers, so string.format stays out of the hot loop and wrk leaves the CPU to the servers.
local seed, n, misses, fed = 0, 0, 0, 0
statuses = {}  -- a global: done() reads each thread's through thread:get
local basic, bearer, admin, wrong, wrong_bearer
local fixed, schedule, pool = {}, {}, {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local function b64(s)
  local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  return ((s:gsub(".", function(x)
    local r, b = "", x:byte()
    for i = 8, 1, -1 do r = r .. (b % 2 ^ i - b % 2 ^ (i - 1) > 0 and "1" or "0") end
    return r
  end) .. "0000"):gsub("%d%d%d?%d?%d?%d?", function(x)
    if #x < 6 then return "" end
    local c = 0
    for i = 1, 6 do c = c + (x:sub(i, i) == "1" and 2 ^ (6 - i) or 0) end
    return chars:sub(c + 1, c + 1)
  end) .. ({ "", "==", "=" })[#s % 3 + 1])
end

-- A request's headers: wrk.format adds Host and Content-Length to the table it is given, so each call gets its own.
local function headers(auth, ctype, extra)
  local h = { ["Authorization"] = auth, ["Content-Type"] = ctype or "application/json" }
  if auth == nil then h["Authorization"] = nil end
  for k, v in pairs(extra or {}) do h[k] = v end
  return h
end

-- One iris row from the pools: 4 values in the ranges the features take, 1024^4 combinations.
local function row(sep)
  local r = math.random
  return pool[1][r(1024)] .. sep .. pool[2][r(1024)] .. sep .. pool[3][r(1024)] .. sep .. pool[4][r(1024)]
end

local function rows(k)
  local out = {}
  for i = 1, k do out[i] = "[" .. row(",") .. "]" end
  return table.concat(out, ",")
end

local dynamic = {
  -- A 1-row miss under a request id of ours, so feedback can name it later.
  miss = function()
    misses = misses + 1
    return wrk.format("POST", "/models/iris/predict", headers(basic, nil, {
      ["X-Request-ID"] = string.format("stress-%d-%d-%d", seed, tid, misses) }),
      '{"features":[[' .. row(",") .. "]]}")
  end,
  batch = function()
    return wrk.format("POST", "/models/iris/versions/1/predict", headers(bearer), '{"instances":[' .. rows(50) .. "]}")
  end,
  csv = function()
    local body = "sepal_length,sepal_width,petal_length,petal_width\n" .. row(",") .. "\n" .. row(",") .. "\n"
    return wrk.format("POST", "/predict?probabilities=true", headers(basic, "text/csv"), body)
  end,
  mlflow = function()
    return wrk.format("POST", "/invocations", headers(basic),
      '{"dataframe_split":{"columns":["sepal_length","sepal_width","petal_length","petal_width"],"data":['
      .. rows(2) .. "]}}")
  end,
  v2 = function()
    return wrk.format("POST", "/v2/models/iris/infer", headers(bearer),
      '{"inputs":[{"name":"input","shape":[2,4],"datatype":"FP64","data":[' .. rows(2) .. "]}]}")
  end,
  -- Truth for this thread's misses in order, each once, at least 32 misses behind: long answered by then.
  feedback = function()
    if fed >= misses - 32 then return fixed.hit end
    fed = fed + 1
    return wrk.format("POST", "/feedback", headers(basic), string.format(
      '{"request_id":"stress-%d-%d-%d","truth":["setosa"]}', seed, tid, fed))
  end,
}

function init(args)
  seed = tonumber(args[1])
  basic = "Basic " .. b64(args[2] .. ":" .. args[3])
  bearer = "Bearer " .. args[3]
  admin = "Basic " .. b64(args[4] .. ":" .. args[5])
  wrong = "Basic " .. b64(args[2] .. ":not-the-key")
  wrong_bearer = "Bearer not-the-key"
  math.randomseed(seed * 1000 + tid)
  local lo, hi = { 4.3, 2.0, 1.0, 0.1 }, { 7.9, 4.4, 6.9, 2.5 }
  for f = 1, 4 do
    pool[f] = {}
    for i = 1, 1024 do pool[f][i] = string.format("%.4f", lo[f] + math.random() * (hi[f] - lo[f])) end
  end
  local hit = '{"features":[[5.1,3.5,1.4,0.2]]}'
  fixed = {
    hit = wrk.format("POST", "/predict", headers(basic), hit),
    v1 = wrk.format("POST", "/v1/models/iris:predict", headers(basic),
      '{"instances":[[6.7,3.0,5.2,2.3],{"sepal_length":5.1,"sepal_width":3.5,"petal_length":1.4,"petal_width":0.2}]}'),
    models = wrk.format("GET", "/models", headers(bearer)),
    v2_meta = wrk.format("GET", "/v2/models/iris", headers(basic)),
    v1_meta = wrk.format("GET", "/v1/models/iris", headers(basic)),
    ready = wrk.format("GET", "/ready", headers(nil)),
    health = wrk.format("GET", "/health", headers(nil)),
    v2_ready = wrk.format("GET", "/v2/health/ready", headers(nil)),
    metrics = wrk.format("GET", "/metrics", headers(admin)),
    status = wrk.format("GET", "/status", headers(admin)),
    admin_models = wrk.format("GET", "/admin/models", headers(admin)),
    bad_rows = wrk.format("POST", "/predict", headers(basic), '{"features":[[1.0,2.0,3.0]]}'),
    bad_json = wrk.format("POST", "/invocations", headers(basic), '{"inputs": [[1.0,'),
    bad_v2 = wrk.format("POST", "/v2/models/iris/infer", headers(basic),
      '{"inputs":[{"name":"input","shape":[3,4],"datatype":"FP64","data":[1,2,3,4]}]}'),
    wrong_key = wrk.format("POST", "/predict", headers(wrong), hit),
    wrong_bearer = wrk.format("GET", "/models", headers(wrong_bearer)),
    no_auth = wrk.format("POST", "/v1/models/iris:predict", headers(nil), hit),
    no_model = wrk.format("POST", "/models/nope/predict", headers(basic), hit),
    no_path = wrk.format("GET", "/nope", headers(basic)),
    forbidden = wrk.format("GET", "/admin/users", headers(basic)),
  }
  -- Per 100 requests: 60 predictions (30 of them hits), 5 feedback, 12 reads, 1 admin read, 13 errors.
  local mix = {
    hit = 20, miss = 14, batch = 4, csv = 4, mlflow = 6, v1 = 6, v2 = 6, feedback = 5,
    models = 2, v2_meta = 2, v1_meta = 2, ready = 2, health = 2, v2_ready = 2, metrics = 1,
    bad_rows = 3, bad_json = 2, bad_v2 = 2, wrong_key = 2, wrong_bearer = 1, no_auth = 1, no_model = 1, no_path = 1,
    forbidden = 1,
  }
  local kinds = {}
  for kind, count in pairs(mix) do
    for _ = 1, count do table.insert(kinds, kind) end
  end
  table.sort(kinds)
  for i = #kinds, 2, -1 do  -- shuffle, seeded: each thread interleaves the kinds differently
    local j = math.random(i)
    kinds[i], kinds[j] = kinds[j], kinds[i]
  end
  schedule = kinds
end

function request()
  n = n + 1
  local kind = schedule[(n - 1) % #schedule + 1]
  -- /status and /admin/models are the heaviest reads: once per 200 requests each, in place of the scheduled kind.
  if n % 200 == 0 then kind = "status" elseif n % 200 == 100 then kind = "admin_models" end
  local make = dynamic[kind]
  if make then return make() end
  return fixed[kind]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

-- One machine-readable line for bench.stress: wrk's latency percentiles and errors, and every thread's statuses.
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do total[status] = (total[status] or 0) + count end
  end
  local parts = {}
  for status, count in pairs(total) do table.insert(parts, string.format('"%d":%d', status, count)) end
  local e = summary.errors
  io.write(string.format(
    'STRESS {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"timeout":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean, e.connect, e.read, e.write, e.timeout, table.concat(parts, ",")))
end
