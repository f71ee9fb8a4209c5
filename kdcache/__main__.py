"""``python -m kdcache``: the ``kdcache`` command, for environments without its console script on PATH."""

from kdcache.cli import main

main(prog_name="kdcache")
