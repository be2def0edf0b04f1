"""ONNX Runtime's error messages made readable: on one line, or cut to the failing node.

ORT wraps a failing branch's error in its If node's, puts its C++ source location before the
reason and spreads some reasons over several lines; these helpers give what a user needs.
"""

from __future__ import annotations

import re


def innermost_message(exc: BaseException) -> str:
    """ORT's message from the innermost node that failed: an If wraps its branch's error
    ("...running If node. Name:'If_0' Status Message: ...running Pad node. Name:..."), and
    what matters is the Pad and what it said."""
    text = one_line(exc)
    cut = text.rfind("while running ")
    text = text[cut + len("while running ") :] if cut >= 0 else text
    node = re.match(r"(\w+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if node is not None:
        text = f"{node[1]} node {node[2]!r}: {node[3]}"
    # ORT's source location ("/onnxruntime_src/.../reshape_helper.h:91 onnxruntime::
    # ReshapeHelper::ReshapeHelper(...)") says nothing to a user and pushed the reason (the
    # shapes) past the cut.
    text = _SOURCE_LOCATION.sub("", text).strip()
    if len(text) <= 300:
        return text
    cut = text.rfind(" ", 0, 297)
    return text[: cut if cut > 200 else 297] + "..."


_SOURCE_LOCATION = re.compile(r"\S+\.(?:h|hpp|cc|cpp|cu):\d+ (?:[\w:~<>*&]+\([^)]*\)\s*)?")


def one_line(exc: BaseException) -> str:
    """The whole message on one line, uncut: ORT puts what failed after a long source
    location (a Reshape's "Input shape:{1,16}, requested shape:{1,3,4}" past 300 characters)
    or on later lines (the dims of "Got invalid dimensions for input")."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:300]
