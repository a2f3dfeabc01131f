"""``python -m kvrouter``: the same as the ``kvrouter`` command."""

from kvrouter.cli import main

if __name__ == "__main__":
    main()
