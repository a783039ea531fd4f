"""Errors that cm-beam raises for bad input, so callers can tell them from bugs."""

from __future__ import annotations

from typing import Callable, Optional


class InputError(ValueError):
    """Bad user input: a parameter, a file, a column or a row.

    The message always names what is at fault (the parameter, the file and column, or
    the example_id), because the person reading it is running a long job and must be
    able to fix the input without reading code.

    An error about one parameter of a stage's options carries its name in
    `parameter` and says it as `--name` (each option is the command's flag of the
    same name); a command whose flag for it has another name rewrites the message
    with `for_flag`.
    """

    def __init__(self, message: str, parameter: Optional[str] = None, detail: Optional[str] = None):
        super().__init__(message)
        self.parameter = parameter
        self.detail = detail

    @classmethod
    def bad_parameter(cls, parameter: str, detail: str) -> "InputError":
        """`--parameter: detail`, remembering which parameter is at fault."""
        return cls(f"--{parameter}: {detail}", parameter=parameter, detail=detail)

    def for_flag(self, flag_of: Callable[[str], str]) -> "InputError":
        """The same error naming the command's flag `flag_of(parameter)` instead."""
        if self.parameter is None:
            return self
        flag = flag_of(self.parameter)
        return InputError(f"{flag}: {self.detail}", parameter=self.parameter, detail=self.detail)


# Checks shared by the stages' options: each raises InputError naming the parameter.

def check_choice(parameter: str, value, choices) -> None:
    if value not in choices:
        raise InputError.bad_parameter(parameter, f"must be one of {', '.join(map(str, choices))}, got {value!r}")


def _is_int(value) -> bool:
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(parameter: str, value, low: int = 1, optional: bool = False) -> None:
    """An integer >= low (or None, when optional)."""
    if optional and value is None:
        return
    if not _is_int(value) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise InputError.bad_parameter(parameter, f"must be {what}, got {value!r}")


def check_required(parameter: str, value) -> None:
    if value is None or value == "":
        raise InputError.bad_parameter(parameter, "is required")
