"""``ferry.net``: the socket toolkit (toy servers, a netcat-like client, a raw HTTP fetch, a port probe)."""
