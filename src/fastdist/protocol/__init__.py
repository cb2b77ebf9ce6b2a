"""What travels between processes: message kinds, serialization and the handshake."""
