-- A low-rate GET (a latency probe beside a flood): each connection waits DELAY_MS between requests
-- (wrk's `delay` hook). Usage: wrk -s probe.lua URL -- DELAY_MS [TOKEN]
local common = require("common")
local pause = 0

setup = common.setup
done = common.done

function init(args)
  pause = tonumber(args[1])
  if args[2] and args[2] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[2]
  end
end

function delay()
  return pause
end

function response(status, headers, body)
  common.count(status)
end
