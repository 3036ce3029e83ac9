"""ZeroMQ sockets and their I/O loop, bounded queues, peer liveness, codec, keys, faults; no RL."""
