"""The ferry client: connecting, TLS certificate pinning, and transfers."""
