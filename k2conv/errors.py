"""One error type for every bad input, so the CLI can print one line and exit 2.

Deep code raises `K2ConvError("file.safetensors: tensor x: what is wrong")`; the CLI catches it,
prints the message alone (no traceback) and exits with status 2. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class K2ConvError(Exception):
    """Bad input or an unsatisfiable request; the message names the file/tensor at fault."""

    exit_code = 2
