"""ZeroMQ sockets, the wire codec, CURVE keys and injected faults; no RL."""
