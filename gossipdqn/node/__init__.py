"""One node: its loop, records, checkpoints and actor processes."""
