"""Scans on one device, every form that runs there, as memory bandwidth: the first-order scan at
(batch 8, 1536 channels, T) and the matrix-state scan at (1 x heads, T, dk = dv = 64).

On CUDA: the Triton kernels vs torch's chunked forms (and the Python loop where T is short);
GB/s counts the bytes a fused kernel must move (first order: read a, b, write h; matrix state:
read q, k, v, decay, write o) against a device-to-device copy of the same bytes (the achievable
bandwidth). Issue 4's GPU goal: the first-order kernel at >= 70% of that for T >= 4k.
On CPU the same script times the native kernel and the chunked forms (for a quick check).
Each line's ratio is the torch chunked form's time over that form's (above 1: faster).

    python benchmarks/scan_device.py --device cuda [--T 1024 4096 16384 65536 131072]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from harness import device_name, emit, time_fn  # noqa: E402

import wavefront.backends.scans.linear.triton as triton_scan  # noqa: E402
import wavefront.backends.scans.matrix.triton as triton_matrix  # noqa: E402
from wavefront.backends.scans.linear.dispatch import linear_scan  # noqa: E402
from wavefront.backends.scans.matrix.chunked import chunked_matrix_scan  # noqa: E402
from wavefront.backends.scans.linear.naive import linear_scan_reference  # noqa: E402
from wavefront.backends.scans.matrix.naive import matrix_scan_reference
from wavefront.testing import rel_err  # noqa: E402


def _median(fn, device, repeats):
    ts = sorted(time_fn(fn, warmup=1, repeats=repeats, device=device))
    return ts[len(ts) // 2]


def _time_forms(forms: dict, error_of, device: str, repeats: int) -> dict:
    """{form: (median seconds, error)}, all forms timed in this run (ratio: the first form's time over each's)."""
    out = {}
    with torch.inference_mode():
        for form, fn in forms.items():
            out[form] = (_median(fn, device, repeats), error_of(fn()))
    return out


def _copy_gbps(nbytes: int, device: str, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _median(lambda: dst.copy_(src), device, repeats) / 1e9  # read + write


def first_order(T, device, repeats, batch, channels, loop_max_T):
    a = 0.9 + 0.1 * torch.rand(batch, channels, T, device=device)
    b = torch.randn(batch, channels, T, device=device)
    nbytes = 3 * a.numel() * 4
    forms = {"chunked": lambda: linear_scan(a, b, dim=2, method="chunked")}
    if device == "cpu":
        forms["native"] = lambda: linear_scan(a, b, dim=2, method="native")
    elif triton_scan.available(device)[0]:
        forms["triton"] = lambda: linear_scan(a, b, dim=2, method="triton")
    if T <= loop_max_T:
        forms["loop"] = lambda: linear_scan(a, b, dim=2, method="loop")
    ref = linear_scan_reference(a[:1, :64].double().cpu(), b[:1, :64].double().cpu(), dim=2)
    roof = _copy_gbps(nbytes, device, repeats)
    timed = _time_forms(forms, lambda out: rel_err(out[:1, :64].cpu(), ref), device, repeats)
    for form, (s, err) in timed.items():
        emit({"name": "scan_first_order_device", "device": device_name(device), "dtype": "float32",
              "config": {"batch": batch, "channels": channels, "T": T}, "form": form, "seconds": s,
              "ratio": timed["chunked"][0] / s, "gbps": nbytes / s / 1e9, "copy_gbps": roof,
              "fraction_of_copy": nbytes / s / 1e9 / roof, "error": err, "repeats": repeats, "torch": torch.__version__})


def matrix_state(T, device, repeats, heads, d, loop_max_T):
    q, k = (torch.randn(1, heads, T, d, device=device) / d ** 0.5 for _ in range(2))
    v = torch.randn(1, heads, T, d, device=device)
    a = 0.9 + 0.1 * torch.rand(1, heads, T, device=device)
    nbytes = (4 * q.numel() + a.numel()) * 4
    forms = {"chunked_torch": lambda: chunked_matrix_scan(q, k, v, a)}
    if device != "cpu" and triton_scan.available(device)[0]:
        forms["triton_chunked"] = lambda: triton_matrix.triton_matrix_scan(q, k, v, a, form="chunked")
        forms["triton_recurrent"] = lambda: triton_matrix.triton_matrix_scan(q, k, v, a, form="recurrent")
    if T <= loop_max_T:
        forms["loop"] = lambda: matrix_scan_reference(q, k, v, a)
    ref, _ = matrix_scan_reference(*(x[:, :1].double().cpu() for x in (q, k, v, a)))
    timed = _time_forms(forms, lambda out: rel_err(out[0][:, :1].cpu(), ref), device, repeats)
    for form, (s, err) in timed.items():
        emit({"name": "scan_matrix_device", "device": device_name(device), "dtype": "float32",
              "config": {"heads": heads, "T": T, "dk": d, "dv": d, "decay": "scalar"}, "form": form,
              "seconds": s, "ratio": timed["chunked_torch"][0] / s, "gbps": nbytes / s / 1e9, "error": err,
              "repeats": repeats, "torch": torch.__version__})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1536)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--loop-max-T", type=int, default=4096, help="time the Python loop only up to this T")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    for T in args.T:
        first_order(T, args.device, args.repeats, args.batch, args.channels, args.loop_max_T)
        matrix_state(T, args.device, args.repeats, args.heads, args.d, min(args.loop_max_T, 16384))


if __name__ == "__main__":
    main()
