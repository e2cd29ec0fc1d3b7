"""The gateway side of ssh_bridge: chain addons (planner, executor) and the host link."""
