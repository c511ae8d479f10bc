"""Explanation: what wavefront found in a model, what it applies or refuses, and why."""
from __future__ import annotations

from dataclasses import dataclass

from wavefront.passes.dependence import Verdict

NO_SEGMENTS = Verdict(False, "no segment recurrence: diagonal batching does not apply")


@dataclass
class Explanation:
    """What wavefront found in a model, what it would apply or refuses, and why (wavefront.explain).

    >>> print(Explanation("Toy", "none", "runs unchanged: nothing found", NO_SEGMENTS, "unchanged", 0, None))
    captured: runs unchanged: nothing found
    diagonal batching: ILLEGAL. no segment recurrence: diagonal batching does not apply
    schedule: unchanged
    """

    family: str
    adapter: str
    structure: str
    verdict: Verdict
    schedule: str
    n_layers: int
    n_segments: int | None
    batching: str = ""
    backend: str = ""

    @property
    def steps(self) -> dict[str, int] | None:
        if self.n_segments is None:
            return None
        L, S = self.n_layers, self.n_segments
        out = {"sequential": L * S}
        if self.verdict.diagonal_legal:
            out["diagonal"] = L + S - 1
        return out

    def __str__(self) -> str:
        lines = ["captured: " + self.structure, str(self.verdict), f"schedule: {self.schedule}"
                 + (f" on backend {self.backend}" if self.backend else "")]
        if self.steps:
            lines.append(f"steps for {self.n_segments} segments: "
                         + ", ".join(f"{k} {v}" for k, v in self.steps.items()))
        if self.batching:
            lines.append("batched calls:\n" + self.batching)
        return "\n".join(lines)


def unchanged(name: str, reason: str) -> Explanation:
    """The explanation of a model that runs as it is."""
    return Explanation(name, "none", f"runs unchanged: {reason}", NO_SEGMENTS, "unchanged", 0, None)


__all__ = ["Explanation", "NO_SEGMENTS", "unchanged"]
