"""Capture, cell grids' schedules and their views: wavefront.scheduler."""
from .adapters import BoundModel, RecurrenceAdapter, bind_model, register_adapter
from .capture import CaptureError, capture, trace_module
from .schedule import LaneSteps, Schedule, ScheduleError, build_schedule, diagonal, sequential, validate
from .views import grid_text, lanes_text
from .recurrence_graph import RecurrenceGraph, RecurrenceStructure, StateLink

__all__ = ["BoundModel", "RecurrenceAdapter", "bind_model", "register_adapter", "CaptureError", "capture",
           "trace_module", "LaneSteps", "Schedule", "ScheduleError", "build_schedule", "diagonal", "sequential", "validate",
           "grid_text", "lanes_text", "RecurrenceGraph", "RecurrenceStructure", "StateLink"]
