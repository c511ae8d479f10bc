"""What every layer shares: the segment-model contract (segment.py), how results are compared
(checks.py) and the version. Imports nothing else of wavefront."""
