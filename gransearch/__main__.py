"""``python -m gransearch ...``: the same CLI as the ``gransearch`` command."""

from .cli import main

if __name__ == "__main__":
    main()
