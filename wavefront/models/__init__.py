"""Reference recurrent models: their own forward is the sequential reference for every schedule."""
from wavefront.contract.segment import MemoryState, SegmentLMOutput, SegmentRecurrentLM

from .armt import ARMT, ARMTCell, ARMTConfig, ARMTLayer
from .associative_memory import AssociativeMemory, dpfp
from .hf import HFARMT, wrap_armt
from .loop_models import (
           DeltaNet,
           ElmanRNN,
           GatedLinearAttention,
           LinearRecurrence,
           MinGRU,
)
from .rmt import RMT, RMTConfig

__all__ = ["ARMT", "ARMTCell", "ARMTConfig", "ARMTLayer", "AssociativeMemory", "dpfp", "HFARMT", "wrap_armt", "DeltaNet", "ElmanRNN", "GatedLinearAttention", "LinearRecurrence", "MinGRU",
           "RMT", "RMTConfig", "MemoryState", "SegmentLMOutput", "SegmentRecurrentLM"]
