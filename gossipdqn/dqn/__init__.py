"""Single-process DQN: networks, losses, learner, replay, actors, environments; no sockets."""
