"""The client-facing side of ssh_bridge: the SSH server the agents connect to."""
