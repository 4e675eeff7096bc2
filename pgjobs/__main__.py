"""``python -m pgjobs``: the ``pgjobs`` command line."""

from pgjobs.cli import cli

cli(prog_name="pgjobs")
