"""wavefront.distributed on one machine (gloo), CPU fp32: the layer pipeline (stage = layer group,
micro-batch = segment; forward, and a training step through every segment's memory) for a modest
ARMT, and the sequence-parallel scans (linear_scan, matrix_scan, forward), each against one process.

Setups, all timed in one run, interleaved, median of --repeats after a warm-up round: 1 process x
1 thread (the baseline), 1 process x 2 threads (rank 0 runs the single-process form while the
other ranks wait at a barrier), and --procs processes x 1 thread. One JSON line per case and
setup: its median, ratio = baseline / it (above 1: faster than 1 process x 1 thread), the error
(max abs difference over max abs value; for training, of the loss) against the single-process
result, device and machine. On 2 CPU cores expect no speedup from the processes: their value is
capacity (each rank holds only its layers, or its chunk of time) and several devices.

    python benchmarks/distributed.py [--layers 4] [--d-model 256] [--segments 8] [--repeats 5]
                                     [--T-linear 65536] [--T-matrix 8192] [--only pipeline|scans]
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from harness import emit  # noqa: E402

import wavefront  # noqa: E402
import wavefront.distributed as wd  # noqa: E402
from wavefront.backends.scans.linear.dispatch import linear_scan  # noqa: E402
from wavefront.backends.scans.matrix.dispatch import matrix_scan  # noqa: E402
from wavefront.models import ARMT, ARMTConfig  # noqa: E402


def timed(fn):
    """Seconds of fn, the ranks starting together and ending when the slowest is done."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - t0


def pipeline_cases(args, rank):
    """(name, config, single-process fn, distributed fn, the distributed result on rank 0)."""
    cfg = dict(vocab_size=1024, d_model=args.d_model, n_layers=args.layers, n_heads=4, d_ff=4 * args.d_model,
               segment_len=args.segment_len, n_mem_tokens=16, d_mem=32)
    torch.manual_seed(0)
    model = ARMT(ARMTConfig(**cfg)).eval()
    fast = wavefront.optimize(model)
    pp = wd.pipeline(model)
    ids = torch.randint(0, cfg["vocab_size"], (args.batch, args.segments * cfg["segment_len"]),
                        generator=torch.Generator().manual_seed(1))
    config = {**cfg, "segments": args.segments, "batch": args.batch, "split": [len(r) for r in pp.ranges]}

    def single_forward():
        with torch.no_grad():
            return fast(ids).logits

    def single_train():
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    def pipe_train():
        model.zero_grad()
        return pp.train_step(ids, labels=ids)

    def last_stage(fn):  # the last stage's logits / the loss, on rank 0 for the error
        box = [fn()]
        dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
        return box[0]

    yield ("distributed_pipeline_forward", {**config, "single_process": "wavefront.optimize"}, single_forward,
           lambda: pp(ids).logits, lambda: last_stage(lambda: pp(ids).logits))
    yield ("distributed_pipeline_train_step", {**config, "single_process": "the model's own forward + backward"},
           single_train, pipe_train, lambda: last_stage(pipe_train))


def scan_cases(args, rank):
    world = dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    a = 0.9 + 0.1 * torch.rand(1, args.T_linear, args.width, generator=g)
    b = torch.randn(1, args.T_linear, args.width, generator=g)
    q, k = (torch.randn(1, args.heads, args.T_matrix, args.dk, generator=g) / args.dk ** 0.5 for _ in range(2))
    v = torch.randn(1, args.heads, args.T_matrix, args.dv, generator=g)
    decay = 0.9 + 0.1 * torch.rand(1, args.heads, args.T_matrix, generator=g)

    def mine(tensors, dims):
        return [t.tensor_split(world, dim=d)[rank].contiguous() for t, d in zip(tensors, dims)]

    def gathered(fn, dim):
        got = [None] * world
        dist.all_gather_object(got, fn())
        return torch.cat(got, dim=dim)

    a_r, b_r = mine((a, b), (1, 1))
    q_r, k_r, v_r, d_r = mine((q, k, v, decay), (-2, -2, -2, -1))
    linear = lambda: wd.linear_scan(a_r, b_r)  # noqa: E731
    matrix = lambda: wd.matrix_scan(q_r, k_r, v_r, d_r)[0]  # noqa: E731
    yield ("distributed_linear_scan", {"T": args.T_linear, "width": args.width, "B": 1}, lambda: linear_scan(a, b),
           linear, lambda: gathered(linear, 1))
    yield ("distributed_matrix_scan", {"T": args.T_matrix, "heads": args.heads, "dk": args.dk, "dv": args.dv,
                                       "decay": "scalar per step", "B": 1},
           lambda: matrix_scan(q, k, v, decay)[0], matrix, lambda: gathered(matrix, -2))


def worker(rank, world, path, args, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    groups = {"pipeline": pipeline_cases, "scans": scan_cases}
    for group, cases in groups.items():
        if args.only not in (None, group):
            continue
        grad = torch.enable_grad() if group == "pipeline" else torch.inference_mode()
        with grad:
            for name, config, single, split, result in cases(args, rank):
                want = single() if rank == 0 else None
                got = result()
                times = {"1x1": [], "1x2": [], f"{world}x1": []}
                for rep in range(1 + args.repeats):  # the first round is the warm-up
                    for setup in times:
                        procs, threads = map(int, setup.split("x"))
                        if procs == 1:
                            torch.set_num_threads(threads)
                            t = timed(single if rank == 0 else (lambda: None))
                            torch.set_num_threads(1)
                        else:
                            t = timed(split)
                        if rep:
                            times[setup].append(t)
                if rank == 0:
                    err = ((got - want).abs().max() / want.abs().max()).item()
                    base = statistics.median(times["1x1"])
                    for setup, ts in times.items():
                        procs, threads = map(int, setup.split("x"))
                        s = statistics.median(ts)
                        out.put({"name": name, "device": f"cpu ({platform.processor() or platform.machine()}, "
                                                         f"{os.cpu_count()} cores)", "dtype": "float32",
                                 "config": {**config, "processes": procs, "threads_per_process": threads,
                                            "backend": "gloo"},
                                 "seconds": s, "baseline_s": base, "ratio": base / s,
                                 "error": err if procs > 1 else 0.0, "repeats": args.repeats,
                                 "torch": torch.__version__, "machine": platform.node()})
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--segment-len", type=int, default=128)
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--T-linear", type=int, default=2 ** 16)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--T-matrix", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--dk", type=int, default=64)
    ap.add_argument("--dv", type=int, default=64)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["pipeline", "scans"])
    args = ap.parse_args(argv)
    out = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args.procs, os.path.join(tmp, "rendezvous"), args, out),
                           nprocs=args.procs, start_method="spawn")
    while not out.empty():
        emit(out.get())


if __name__ == "__main__":
    main()
