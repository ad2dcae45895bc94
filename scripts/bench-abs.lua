-- wrk script for scripts/bench: sends absolute-form requests (GET http://origin/path) so wrk
-- talks to a forward proxy. Environment: TARGET = the absolute URL (empty: keep wrk's path,
-- for "direct"), CLOSE=1 adds "Connection: close" (a new connection per request).
-- done() prints one JSON line that scripts/bench parses.
local target = os.getenv("TARGET")
if target and target ~= "" then
  wrk.path = target
end
if os.getenv("CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
