"""User-facing errors: each says in one line what is wrong and how to fix it.

The CLI prints ``str(error)`` and exits with status 2; anything else escaping is a bug.
"""


class CastError(Exception):
    """A problem with the user's input or environment, described in one line."""

    def __init__(self, message: str):
        # One line whatever the message was built from (PIL and pip errors carry newlines).
        super().__init__(" ".join(str(message).split()))


class RankError(CastError):
    """A problem of one of torchrun's processes of its own (its torchrun variables, its
    connection to the others, its spill files, its memory), not of the command or the files,
    which every rank meets alike: the CLI has each rank that meets it print it."""


class ImageError(CastError):
    """An image that is missing, unreadable or cannot be written."""


class MaskError(CastError):
    """A label image, soft mask or trimap that does not fit its image or cannot be used."""


class WeightsUnavailable(CastError):
    """Network weights that cannot be fetched, read or verified."""


class MaskWarning(UserWarning):
    """A mask that can be used but is likely not what was drawn (the CLI prints it in one line)."""
