"""ssh_bridge: governed SSH commands and shells.

`server/` faces the clients: an SSH server (asyncssh) that turns every exec request and
every shell line into one HTTP request through the gateway. `terminal/` runs inside the
gateway's chain: the planner (a line as it will run in its session) and the executor that
runs it on the real host with the gateway-held key. They share only the bridge contract
(addons/engine/bridge.py).
"""
