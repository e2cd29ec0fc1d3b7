"""The gateway side of pg_bridge: chain addons (planner, executor) and what they hold."""
