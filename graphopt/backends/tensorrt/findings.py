"""A finding of the TensorRT checks: one reason the parser rejects a node (error) or needs
help with it (warning), from the static rule table or from the parser itself."""

from __future__ import annotations

from dataclasses import dataclass

ERROR = "error"
WARNING = "warning"


class WarningReason(str):
    """A rule's verdict that the parser accepts but the user should know (a warning)."""


@dataclass(frozen=True)
class Finding:
    """One reason TensorRT's parser would reject (error) or needs help with (warning)."""

    severity: str
    node_name: str  # the node's name in the file ("" when unnamed, or not a node)
    op_type: str
    reason: str
    rule: str  # which check found it, or "parser" for the real parser's word
    where: str = ""  # the node's label (see node_labels.prepare), "" for the graph
    fix: str = ""  # the graphopt option or pass that fixes it, "" when none is known

    @property
    def location(self) -> str:
        if self.where:
            return self.where
        return f"node {self.node_name!r} ({self.op_type})" if self.op_type else "graph"

    def describe(self) -> str:
        return f"{self.severity}: {self.location}: {self.reason}"
