-- wrk script: one request per call, POST with a body no other request has (so the gateway's cache never answers),
-- or with BENCH_BODY on every request when that is set (a cache hit or a coalesced answer), or GET when
-- BENCH_METHOD is GET. BENCH_PATH, BENCH_KEY come from the environment.
local method = os.getenv("BENCH_METHOD") or "POST"
local path = os.getenv("BENCH_PATH")
local counter = 0
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local fixed = os.getenv("BENCH_BODY")
if fixed == "" then
  fixed = nil
end
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Ocp-Apim-Subscription-Key"] = os.getenv("BENCH_KEY")
math.randomseed(os.time())
local salt = math.random(1, 1000000000)

request = function()
  counter = counter + 1
  if method == "GET" then
    return wrk.format("GET", path)
  end
  if fixed then
    return wrk.format("POST", path, nil, fixed)
  end
  local body = string.format('{"prompt": "benchmark %d-%d", "duration": %d}', salt, counter, 3 + counter % 8)
  return wrk.format("POST", path, nil, body)
end

-- BENCH_DELAY_MS paces each connection (a rate well below saturation, for latency at a given load)
if pause > 0 then
  delay = function()
    return pause
  end
end
