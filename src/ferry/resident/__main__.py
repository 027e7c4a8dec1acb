"""``python -m ferry.resident``: the resident process (started by :mod:`ferry.resident.spawn`)."""

from ferry.resident.daemon import main

if __name__ == "__main__":
    main()
