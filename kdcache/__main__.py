"""The ``kdcache`` program: the console script's entry point (``run``), and ``python -m kdcache`` for environments
without that script on PATH."""

from __future__ import annotations

import sys


def run() -> None:
    """Import the command line, then run it. A Ctrl-C while it imports (click and kdcache.cli, about 0.1 s; torch is
    imported later, by the commands that need it) ends the program as a Ctrl-C during a command does, one line and exit
    130, not a traceback from the middle of an import."""
    try:
        from kdcache.cli import main
    except KeyboardInterrupt:
        print("Error: interrupted before the command started; nothing was done", file=sys.stderr)
        sys.exit(130)  # kdcache.cli's _Interrupted, which was not imported
    main(prog_name="kdcache")


if __name__ == "__main__":
    run()
