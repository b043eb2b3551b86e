-- POST a fixed JSON body (the bare-Starlette baseline). Usage: wrk -s post_json.lua URL -- 'JSON'
local common = require("common")

setup = common.setup
done = common.done

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = args[1] or "{}"
end

function response(status, headers, body)
  common.count(status)
end
