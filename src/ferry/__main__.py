"""``python -m ferry`` runs the command line (through a resident process when there is one)."""

from ferry.resident.thin import main

if __name__ == "__main__":
    main()
