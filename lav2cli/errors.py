"""The one exception type commands turn into a one-line message and exit status 1."""


class Lav2Error(Exception):
    """A user-facing failure: bad input, a missing file, a mismatched checkpoint.

    The message must say what is wrong and where (file, line, tensor name) in one line.
    """
