"""The ``kdcache`` program: the console script's entry point (``run``), and ``python -m kdcache`` for environments
without that script on PATH."""

from __future__ import annotations

import sys


def run() -> None:
    """Import the command line, then run it. A Ctrl-C while it imports (click and kdcache.cli, about 0.1 s; torch is
    imported later, by the commands that need it) ends the program as a Ctrl-C during a command does, one line and exit
    130, not a traceback from the middle of an import. It is noted while the import runs and said once it has ended:
    Python's handler raised KeyboardInterrupt wherever the import was, where it could be dropped (in importlib's
    clean-up of a module lock, a weakref callback: "Exception ignored" and a traceback, and the command ran to its end,
    exit 0) or leave the process ended by SIGINT once it had said its line (exit -2 where a shell said 130). A second
    Ctrl-C is raised where the import is: one that never ends (a stalled network file system) is given up."""
    pressed: list[object] = []
    before = None

    def note(signum: int, frame: object) -> None:  # noted, said once the import has ended; the second raised
        if pressed:
            raise KeyboardInterrupt
        pressed.append(signum)

    try:
        import signal  # here, not at the top: Python's handler, until the program's, raises a Ctrl-C as KeyboardInterrupt

        before = signal.getsignal(signal.SIGINT)
        if before is signal.default_int_handler:  # not one ignored (a job started in the background) or a caller's own
            signal.signal(signal.SIGINT, note)
        from kdcache.cli import main
    except KeyboardInterrupt as e:  # Python's handler's, or a caller's own
        pressed.append(e)
    finally:
        if before is not None and before is signal.default_int_handler:
            signal.signal(signal.SIGINT, before)
    if pressed:
        print("Error: interrupted before the command started; nothing was done", file=sys.stderr)
        sys.exit(130)  # kdcache.cli's _Interrupted, which was not imported
    main(prog_name="kdcache")


if __name__ == "__main__":
    run()
