"""The benchmark scripts' harness: wavefront.benchmarking (shared with `wavefront bench`)."""
from wavefront.benchmarking import compare, device_name, emit, time_fn  # noqa: F401
