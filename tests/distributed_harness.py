"""Run a function on WORLD gloo ranks in spawned processes, for the distributed tests: a file://
rendezvous in a temporary folder, a process-group timeout so a failing rank cannot hang the
suite, one OpenMP thread per rank (2 cores), and a join with a timeout."""
import datetime
import multiprocessing
import os
import sys
import traceback

import torch

JOIN_S = 120


def _worker(rank, world, tmp, cases):
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(__file__))  # the tests' own modules (conftest's builders)
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        torch.save(cases(rank), f"{tmp}/rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        with open(f"{tmp}/rank{rank}.err", "w") as f:
            f.write(traceback.format_exc())
        raise


def spawn_ranks(tmp: str, cases, world: int = 2) -> list:
    """[cases(rank) for every rank], each run in its own process of one process group (`cases`
    must be a module-level function); fails if a rank hangs or exits non-zero."""
    ctx = multiprocessing.get_context("spawn")
    env = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned ranks: no OpenMP spinning on 2 cores
    try:
        procs = [ctx.Process(target=_worker, args=(rank, world, tmp, cases)) for rank in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=JOIN_S)
    finally:
        if env is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errs = "".join(open(f"{tmp}/rank{r}.err").read() for r in range(world) if os.path.exists(f"{tmp}/rank{r}.err"))
    assert not hung, f"ranks still running after {JOIN_S} s: {hung}\n{errs}"
    assert all(p.exitcode == 0 for p in procs), f"exit codes {[p.exitcode for p in procs]}\n{errs}"
    return [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
