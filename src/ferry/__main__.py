"""``python -m ferry`` runs the command line."""

from ferry.cli import main

if __name__ == "__main__":
    main()
