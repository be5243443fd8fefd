--[[
  Returns the clock of the Redis server that holds a key, to compare with times that server's
  scripts recorded (the registry's `seen`): ListNodes then compares no clock of a scheduler host.

  Input:
    KEYS[1] the key whose server's clock is wanted (only routes the call in a cluster; not read)

  Output:
    the server's time, ms since the epoch
]]
return now_ms()
