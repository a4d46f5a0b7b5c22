"""Runs a function on N local ranks joined in a gloo process group (tests, parity CLI, benchmarks).

    result = launch(fn, nproc, *args, timeout_s=600)

Each rank is a fresh ``spawn``-ed process that initialises ``torch.distributed`` (gloo, or
``backend="nccl"`` with one GPU per rank, over
a TCP store the parent opens on a port the kernel picks, so no other process can take the port
between choosing and binding it; RANK/WORLD_SIZE/LOCAL_RANK set like torchrun), calls
``fn(rank, world_size, *args)`` and tears the group down. ``launch`` returns rank 0's return
value (it must be picklable). If any rank raises, every other rank is terminated and
``LaunchError`` carries that rank's traceback; if a rank dies without a word (a crash) or the
whole run exceeds ``timeout_s``, the rest are terminated as well, so a broken rank never
hangs the caller. ``fn`` must be importable by name (a module-level function) because the
children are spawned, not forked.
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class LaunchError(RuntimeError):
    """A rank failed, crashed or timed out; the message holds the rank and its traceback."""


def open_store(host: str, world: int, timeout_s: float = 600.0) -> dist.TCPStore:
    """A rendezvous store listening on a port the kernel chooses (``store.port``): binding
    first and telling the port afterwards leaves no window for another process to take it."""
    return dist.TCPStore(host, 0, world, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=timeout_s))


def join_group(backend: str, host: str, port: int, rank: int, world: int, timeout_s: float = 600.0) -> None:
    """Joins the default process group through the store at ``host:port`` (``open_store``)."""
    store = dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))


def _rank_main(rank, world, port, timeout_s, backend, results, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    # The ranks share the machine's cores: one thread each avoids oversubscription.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        join_group(backend, "127.0.0.1", port, rank, world, timeout_s)
        value = fn(rank, world, *args)
        # Plain pickle copies tensors into the message: torch's queue reducers would share
        # memory through file descriptors that die with this process.
        results.put((rank, "ok", pickle.dumps(value if rank == 0 else None)))
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _crashes(procs, reported, grace_s: float = 2.0) -> str:
    """Lines naming the ranks that died without reporting. Waits briefly: when one rank
    crashes, its peers often fail first with a mere connection error."""
    end = time.monotonic() + grace_s
    while True:
        dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
        if dead or time.monotonic() > end or all(p.exitcode is not None for p in procs):
            break
        time.sleep(0.1)
    return "".join(f"rank {r} of {len(procs)} exited with code {code} without a result\n" for r, code in dead)


def launch(fn, nproc: int, *args, timeout_s: float = 600.0, backend: str = "gloo"):
    """Runs ``fn(rank, nproc, *args)`` on ``nproc`` spawned ranks and returns rank 0's result."""
    if nproc < 1:
        raise ValueError(f"nproc={nproc}: must be >= 1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = open_store("127.0.0.1", nproc, timeout_s)  # held open until the ranks are done
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, store.port, timeout_s, backend, results, fn, args))
             for r in range(nproc)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    reported: dict[int, tuple[str, object]] = {}
    try:
        while len(reported) < nproc:
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                # A rank reports before it exits, so exit code 0 means its result is in
                # flight; any other code is a crash that could not report.
                if any(r not in reported and p.exitcode not in (None, 0) for r, p in enumerate(procs)):
                    raise LaunchError(_crashes(procs, reported).rstrip()) from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(nproc)) - reported.keys())
                    raise LaunchError(f"timed out after {timeout_s:.0f} s waiting for ranks {missing}") from None
                continue
            reported[rank] = (status, value)
            if status == "error":
                raise LaunchError(_crashes(procs, reported) + f"rank {rank} of {nproc} failed:\n{value}")
        for p in procs:
            p.join(timeout=30)
        return pickle.loads(reported[0][1])
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        results.close()
