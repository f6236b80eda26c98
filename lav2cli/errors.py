"""The one exception type commands turn into a one-line message and exit status 1."""


class Lav2Error(Exception):
    """A user-facing failure: bad input, a missing file, a mismatched checkpoint.

    The message must say what is wrong and where (file, line, tensor name) in one line.
    """


class Lav2Note(UserWarning):
    """Something the user should know that does not stop the command (an unwritable cache).

    Raised with ``warnings.warn(message, Lav2Note)``; the command line shows it as one
    ``lav2: note: ...`` line, without Python's source location."""
