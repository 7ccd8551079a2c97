"""comm_bridge: the CPU-mediated transport between islands whose collective libraries cannot talk."""
