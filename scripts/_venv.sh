# Sourced by scripts/serve and scripts/test: create .venv once and keep it in sync with pyproject.toml.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FERRY_VENV:-$root/.venv}"
extras="${1:-}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi
stamp="$venv/.ferry-installed$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    # A venv made before the distribution was renamed ferry -> ferry-transfer holds both; the old
    # one (and its build metadata in src/) would linger as a second owner of the `ferry` command.
    if [ -e "$root/src/ferry.egg-info" ]; then
        "$venv/bin/python" -m pip uninstall -q -y ferry >/dev/null 2>&1 || true
        rm -rf "$root/src/ferry.egg-info"
    fi
    "$venv/bin/python" -m pip install -q -e "$root$extras" >&2
    touch "$stamp"
fi
