"""What to send to peers and how to mix what arrives; no sockets."""
