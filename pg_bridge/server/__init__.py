"""The client-facing side of pg_bridge: the wire protocol and the listener."""
