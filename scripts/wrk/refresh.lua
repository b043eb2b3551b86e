-- POST /refresh with rotation: every token is spent once. Each thread keeps a queue of refresh tokens,
-- seeded with its share of TOKENS_FILE (from logins made before the run), and pushes the refresh_token
-- of every 200 answer, so the queue stays as long as it started while answers are 200.
-- Usage: wrk -s refresh.lua URL -- TOKENS_FILE THREADS
local common = require("common")
local queue = {}
local head, tail = 1, 0

setup = common.setup
done = common.done

local function push(token)
  tail = tail + 1
  queue[tail] = token
end

local function pop()
  if head > tail then
    return nil
  end
  local token = queue[head]
  queue[head] = nil
  head = head + 1
  return token
end

function init(args)
  for _, token in ipairs(common.my_lines(args[1], tonumber(args[2]))) do
    push(token)
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  -- An empty queue means answers were lost: send an empty token, which fails and is counted.
  local token = pop() or ""
  return wrk.format(nil, nil, nil, '{"refresh_token":"' .. token .. '"}')
end

function response(status, headers, body)
  if common.count(status) then
    local token = body:match('"refresh_token"%s*:%s*"([^"]+)"')
    if token then
      push(token)
    end
  end
end
