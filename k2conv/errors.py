"""One error type for every bad input, so the CLI can print one line and exit 2.

Deep code raises `K2ConvError("file.safetensors: tensor x: what is wrong")`; the CLI catches it,
prints the message alone (no traceback) and exits with status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def one_line(message: str) -> str:
    """The message with control characters escaped: names read from hostile files (a tensor called
    "a\\nb") must not split the one-line error or drive the terminal."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], message)


class K2ConvError(Exception):
    """Bad input or an unsatisfiable request; the message names the file/tensor at fault."""

    exit_code = 2

    def __init__(self, message: str = "", *args: object) -> None:
        super().__init__(one_line(str(message)), *args)
