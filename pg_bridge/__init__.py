"""pg_bridge: governed PostgreSQL for unmodified clients.

Two halves, in two subpackages. `server/` faces the clients: it speaks the PostgreSQL v3
wire protocol and turns each client step into one HTTP request through the gateway.
`terminal/` runs inside the gateway's chain: the planner (what a statement does in its
session), the executor that answers the flow on the real server with the gateway-held
login, the backend connection, the sessions and the catalog. They share only the bridge
contract (addons/engine/bridge.py).
"""
