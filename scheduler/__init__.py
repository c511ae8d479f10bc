"""Capture, cell grids' schedules and their views: wavefront.scheduler."""
from wavefront.scheduler.adapters import (
           BoundModel,
           RecurrenceAdapter,
           bind_model,
           register_adapter,
)
from wavefront.scheduler.capture import CaptureError, capture, trace_module
from wavefront.scheduler.recurrence_graph import (
           RecurrenceGraph,
           RecurrenceStructure,
           StateLink,
)
from wavefront.scheduler.schedule import (
           LaneSteps,
           Schedule,
           ScheduleError,
           build_schedule,
           diagonal,
           sequential,
           validate,
)
from wavefront.scheduler.views import grid_text, lanes_text

__all__ = ["BoundModel", "RecurrenceAdapter", "bind_model", "register_adapter", "CaptureError", "capture",
           "trace_module", "LaneSteps", "Schedule", "ScheduleError", "build_schedule", "diagonal", "sequential", "validate",
           "grid_text", "lanes_text", "RecurrenceGraph", "RecurrenceStructure", "StateLink"]
