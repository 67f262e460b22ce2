-- wrk script: POST /metric events for 100 devices.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"device_id":"hot-%d","cpu":0.5,"rps":%d}', n % 100, 100 + n % 17)
  return wrk.format(nil, "/metric", nil, body)
end
