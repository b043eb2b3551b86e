-- Shared by the bench's wrk scripts: count non-2xx answers per thread, print one JSON summary line.
-- Each wrk thread runs its own Lua state; setup() runs in the main state and keeps every thread so
-- that done() can add up the counters the threads kept.
local common = {}
local threads = {}

-- Run in the main state once per thread, just before that thread's init(): give it its index.
-- (wrk sets up and inits one thread after the other, so the thread count is not known here yet.)
function common.setup(thread)
  thread:set("thread_index", #threads)
  table.insert(threads, thread)
end

-- Count an answer in the calling thread; return whether it was a 2xx.
function common.count(status)
  if status < 200 or status > 299 then
    non2xx = (non2xx or 0) + 1
    if not first_bad then
      first_bad = status
    end
    return false
  end
  return true
end

-- Print the run as one line `BENCH_JSON {...}`, read by scripts/bench_wrk.py.
function common.done(summary, latency, requests)
  local bad, first = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + (t:get("non2xx") or 0)
    if first == 0 then
      first = t:get("first_bad") or 0
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"non2xx":%d,"first_non2xx_status":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
    '"timeouts":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(99),
    latency.max, bad, first, e.connect, e.read, e.write, e.timeout))
end

-- Read the lines of a file that belong to this thread (line i goes to thread i mod thread_count).
function common.my_lines(path, thread_count)
  local mine, i = {}, 0
  for line in io.lines(path) do
    if line ~= "" then
      if i % thread_count == thread_index then
        table.insert(mine, line)
      end
      i = i + 1
    end
  end
  return mine
end

return common
