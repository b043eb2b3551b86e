-- POST /login, cycling through this thread's share of the accounts, so that no one email takes every
-- attempt (a per-email throttle must never be what is measured). Usage: -- EMAILS_FILE PASSWORD THREADS
local common = require("common")
local bodies = {}
local next_body = 0

setup = common.setup
done = common.done

function init(args)
  for _, email in ipairs(common.my_lines(args[1], tonumber(args[3]))) do
    table.insert(bodies, string.format('{"email":"%s","password":"%s"}', email, args[2]))
  end
  if #bodies == 0 then
    error("login.lua: no email for thread " .. thread_index .. " in " .. args[1])
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  next_body = next_body % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[next_body])
end

function response(status, headers, body)
  common.count(status)
end
