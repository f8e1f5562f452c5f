"""``python -m cast``: the same as the ``cast`` command."""

from .cli import run

run()
