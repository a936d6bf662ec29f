-- wrk script for the benches: POST new rows every request, in the body shape the server takes.
-- Arguments (after `--`): rows features seed [body [shape]]. With a body (not empty), every request sends it (the
-- cache-hit shape). Without one, request() builds fresh rows each time from a per-thread pool of pre-formatted
-- numbers: 4096^features combinations, so rows never repeat (every request is a cache miss), while
-- string.format stays out of the hot loop so wrk does not eat the CPU the servers need. The shape (bench/peers.py):
--   features (the default): {"features": [[...], ...]}   Sibyl's /predict, the tutorial app, the BentoML service
--   inputs: {"inputs": [[...], ...]}                      MLflow's /invocations (its tensor input)
--   v2: {"inputs": [{"name": "predict", "shape": [n, f], "datatype": "FP64", "data": [...]}]}
--                                                         Open Inference Protocol, MLServer's /v2/models/<m>/infer
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = 0
local rows, features, pool, fixed, shape = 1, 20, {}, nil, "features"

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function init(args)
  rows, features = tonumber(args[1]), tonumber(args[2])
  -- Seeded per thread (and per run by the caller) so threads and runs never send the same rows.
  math.randomseed(tonumber(args[3]) * 1000 + tid)
  for i = 1, 4096 do
    pool[i] = string.format("%.5f", math.random() * 4 - 2)
  end
  if args[4] and args[4] ~= "" then
    fixed = wrk.format(nil, nil, nil, args[4])
  end
  shape = args[5] or shape
  if shape ~= "features" and shape ~= "inputs" and shape ~= "v2" then
    error("predict.lua: unknown shape " .. tostring(shape))
  end
end

function request()
  if fixed then
    return fixed
  end
  local out, row, random = {}, {}, math.random
  for r = 1, rows do
    for f = 1, features do
      row[f] = pool[random(4096)]
    end
    out[r] = table.concat(row, ",")
  end
  local body
  if shape == "v2" then
    -- Flat, row-major data, as the protocol's examples send it.
    body = '{"inputs":[{"name":"predict","shape":[' .. rows .. "," .. features ..
      '],"datatype":"FP64","data":[' .. table.concat(out, ",") .. "]}]}"
  else
    body = '{"' .. shape .. '":[[' .. table.concat(out, "],[") .. "]]}"
  end
  return wrk.format(nil, nil, nil, body)
end

-- One machine-readable line for bench.measure.wrk; wrk's errors.status counts responses with status >= 400.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
