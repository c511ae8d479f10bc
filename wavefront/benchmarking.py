"""Benchmark harness (benchmarks/ and `wavefront bench`): time both sides in the same run, median
after warm-up, one JSON line each.

Every measurement line carries: name, device, dtype, config, the two timings (seconds), their
ratio, the error between the two outputs, and the torch version, so results compare across
machines as ratios. Benchmarks are scripts, never timed tests.
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import torch


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU's architecture, vector extensions and torch's thread count: two
    machines with the same core count differ by several times in what their kernels reach (AVX-512
    and AMX against AVX2), so a recorded figure names the extensions it ran with.

    >>> device_name().startswith("cpu (")
    True
    """
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    isa = _vector_extensions()
    return (f"cpu ({platform.processor() or platform.machine()}, " + (f"{isa}, " if isa else "")
            + f"{torch.get_num_threads()} threads)")


def _vector_extensions() -> str:
    """The widest x86 vector extensions /proc/cpuinfo lists ("avx512+amx", "avx2"), "" elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ""
    found = [name for name, flag in (("avx512", "avx512f"), ("amx", "amx_tile")) if flag in flags]
    return "+".join(found) or ("avx2" if "avx2" in flags else "")


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, *, warmup: int = 1, repeats: int = 5, device: str = "cpu") -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls (synchronising on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def compare(name: str, baseline, candidate, *, config: dict, dtype, device: str = "cpu", error: float,
            warmup: int = 1, repeats: int = 5, baseline_label: str = "baseline",
            candidate_label: str = "candidate", extra: dict | None = None, quiet: bool = False) -> dict:
    """Time `baseline` and `candidate` interleaved in one run; print and return the JSON record.

    ratio = median(baseline) / median(candidate): above 1 means the candidate is faster.
    """
    for _ in range(warmup):
        baseline()
        candidate()
    tb, tc = [], []
    for _ in range(repeats):  # interleaved so drift on a shared machine hits both sides alike
        tb += time_fn(baseline, warmup=0, repeats=1, device=device)
        tc += time_fn(candidate, warmup=0, repeats=1, device=device)
    mb, mc = statistics.median(tb), statistics.median(tc)
    record = {"name": name, "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "config": config, baseline_label + "_s": mb, candidate_label + "_s": mc,
              "ratio": mb / mc, "error": error, "repeats": repeats, "torch": torch.__version__,
              }
    record.update(extra or {})
    if not quiet:
        emit(record)
    return record


def emit(record: dict) -> None:
    """Print one measurement as a JSON line."""
    print(json.dumps(record), flush=True)
