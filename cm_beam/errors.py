"""Errors that cm-beam raises for bad input, so callers can tell them from bugs."""


class InputError(ValueError):
    """Bad user input: a flag, a file, a column or a row.

    The message always names what is at fault (the flag, the file and column, or the
    example_id), because the person reading it is running a long job and must be able
    to fix the input without reading code.
    """
