"""UnchangedModel: what optimize() returns when no route applies: the model, run as it is."""
from __future__ import annotations

from torch import nn

from wavefront.routes.base import Optimized
from wavefront.routes.explanation import Explanation, unchanged
from wavefront.stages import Stage


class UnchangedModel(Optimized):
    """The model itself, called as it is; `reason` (and explain()) says why nothing was applied.

    >>> import torch
    >>> plain = UnchangedModel(torch.nn.Linear(2, 2), "no recurrence found", {})
    >>> plain.reason, plain(torch.zeros(1, 2)).shape
    ('no recurrence found', torch.Size([1, 2]))
    """

    route = "unchanged"

    def __init__(self, model: nn.Module, reason: str, options: dict | None = None):
        super().__init__(model, options or {}, verify=False)  # the model's own forward: nothing to verify
        self.reason = reason

    def run(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def rewrites(self) -> list[str]:
        return [f"nothing rewritten: {self.reason}"]

    def explain(self, n_segments: int | None = None) -> Explanation:
        return unchanged(type(self.model).__name__, self.reason)

    def stages(self) -> list[Stage]:
        return [*self.stage_log, Stage("unchanged", self.model, 0.0, self.reason)]

    def extra_repr(self) -> str:
        return f"unchanged: {self.reason}"


__all__ = ["UnchangedModel"]
