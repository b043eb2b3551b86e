-- GET the URL wrk was given, with an optional bearer token. Usage: wrk -s get.lua URL -- [TOKEN]
local common = require("common")

setup = common.setup
done = common.done

function init(args)
  if args[1] and args[1] ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. args[1]
  end
end

function response(status, headers, body)
  common.count(status)
end
