"""The ferry server: accounts, TLS, sessions and request handlers."""
