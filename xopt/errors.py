"""The one exception type that reaches users, and the wording of its one-line messages.

A `XoptError` carries a single actionable line ("input.onnx: not an ONNX model (truncated
protobuf)"); the CLI prints it on stderr and exits 2. Anything else escaping is a bug in xopt
and keeps its traceback.
"""

from __future__ import annotations


class XoptError(Exception):
    """A problem with the user's input or options, stated in one line."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none; a first line
    that ends in a colon ("The following inconsistencies were found:") takes the next one too."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def require_model(function: str, model: object) -> None:
    """Raise unless `model` is an onnx_ir Model: what every API function after `xopt.load` takes."""
    import onnx_ir as ir

    if not isinstance(model, ir.Model):
        raise XoptError(f"{function} takes an onnx_ir Model (from xopt.load), not a {type(model).__name__}")
    if not model.graph.outputs:
        raise XoptError(f"{function}: the model's graph has no outputs")


def counted(count: int, noun: str) -> str:
    """A count and its noun, plural unless the count is one: "1 token", "2 tokens"."""
    return f"{count} {noun}{'s' * (count != 1)}"
