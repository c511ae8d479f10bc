"""The benchmark scripts' model sizes: wavefront.presets (shared with the `wavefront` CLI)."""
from wavefront.presets import ARMT_PRESETS, split_preset  # noqa: F401
