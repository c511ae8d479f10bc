"""wavefront on several processes: the diagonal schedule as a pipeline over ranks (pipeline) and
scans split along time across the ranks of a torch.distributed process group."""
from wavefront.distributed.layer_pipeline import pipeline
from wavefront.distributed.sequence_parallel import linear_scan, matrix_scan

__all__ = ["linear_scan", "matrix_scan", "pipeline"]
