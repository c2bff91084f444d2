"""Start k local worker processes joined by a ``torch.distributed`` process group, and collect
what each returned (chapter ``ch-distributed``).

:func:`launch` spawns the workers, serves their rendezvous on 127.0.0.1 and always cleans up
(every worker joined, every process group left, the port closed); :func:`choose_backend` picks
``nccl`` with one GPU per worker and ``gloo`` on the CPU otherwise. Nothing here is about batch
norm: the layer is in :mod:`bnbook.distributed`, what the chapter's workers run in
:mod:`bnbook.distributed_workers`.

>>> choose_backend(2, "gloo")
'gloo'
"""

from __future__ import annotations

import pickle
import queue as queue_module
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bnbook._checks import check_positive_int

__all__ = ["LOOPBACK", "BACKENDS", "choose_backend", "worker_device", "launch"]

#: Every process group of this module listens on the loopback interface only.
LOOPBACK = "127.0.0.1"

BACKENDS = ("gloo", "nccl")


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def choose_backend(world_size: int, backend: str | None = None) -> str:
    """The process-group backend for ``world_size`` workers on this machine.

    NCCL drives one GPU per process and refuses two processes on the same GPU ("Duplicate GPU
    detected"), so ``None`` gives ``"nccl"`` only when there are at least ``world_size`` GPUs, and
    ``"gloo"`` otherwise, with every worker on the CPU (gloo runs any number of CPU workers).

    Parameters
    ----------
    world_size : int
        Number of worker processes on this machine.
    backend : {"gloo", "nccl"} or None
        None: choose as above. A name is checked and returned.

    Returns
    -------
    str
        ``"gloo"`` or ``"nccl"``.

    Raises
    ------
    ValueError
        An unknown backend, or ``"nccl"`` with fewer GPUs than workers (the message gives both).

    >>> choose_backend(2, "gloo")
    'gloo'
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(f"backend must be None, 'gloo' or 'nccl', got {backend!r}")
    gpus = _gpu_count()
    if backend is None:
        return "nccl" if world_size <= gpus else "gloo"
    if backend == "nccl" and world_size > gpus:
        raise ValueError(
            f"backend='nccl' needs one GPU per worker, but world_size={world_size} workers were "
            f"asked for and {gpus} GPU(s) are available; use backend='gloo' (or None) to run the "
            "workers on the CPU"
        )
    return backend


def worker_device(rank: int, backend: str) -> torch.device:
    """The device of worker ``rank``: its own GPU under ``nccl``, the CPU under ``gloo``."""
    if backend == "nccl":  # one GPU per worker (choose_backend made sure there are enough)
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _entry(rank, world_size, port, backend, timeout, fn, args, results) -> None:
    """Body of each spawned process: join the group, run ``fn``, always leave the group."""
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(worker_device(rank, backend))
        store = dist.TCPStore(
            LOOPBACK, port, world_size + 1, is_master=False, timeout=timedelta(seconds=timeout)
        )
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: torch's queue reducers would pass tensors through shared memory that
        # disappears when this process exits.
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report any failure to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))


def launch(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: Sequence[Any] = (),
    *,
    backend: str | None = None,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a process group.

    The processes are started with the ``spawn`` method (so ``fn`` must be importable: a module-level
    function of an installed module, not one defined in a notebook) and rendezvous through a
    ``TCPStore`` that this process serves on 127.0.0.1 on a port the operating system picks. Whatever
    happens — a worker raises, the time runs out, the caller is interrupted — every worker is joined
    (terminated if need be), each worker leaves its process group, and the store's port is closed.

    Parameters
    ----------
    fn : callable
        ``fn(rank, world_size, *args)``; its return value must be picklable (e.g. CPU tensors).
    world_size : int
        Number of processes, k ≥ 1.
    args : sequence
        Extra arguments, pickled to every worker.
    backend : {"gloo", "nccl"} or None
        None: :func:`choose_backend` picks ``nccl`` when there is one GPU per worker, else
        ``gloo`` with every worker on the CPU.
    timeout : float
        Seconds for the whole run.

    Returns
    -------
    list
        ``fn``'s return value on each rank, in rank order.

    Raises
    ------
    ValueError
        ``world_size`` < 1, an unknown backend, or ``nccl`` with fewer GPUs than workers (raised
        before any process starts).
    RuntimeError
        A worker raised (the message holds its traceback) or died.
    TimeoutError
        The workers did not all finish within ``timeout`` seconds.
    """
    import torch.multiprocessing as mp

    check_positive_int("world_size", world_size)
    backend = choose_backend(world_size, backend)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    store = dist.TCPStore(
        LOOPBACK,
        0,
        world_size + 1,
        is_master=True,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout),
    )
    procs = [
        ctx.Process(
            target=_entry,
            args=(rank, world_size, store.port, backend, timeout, fn, tuple(args), results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    outputs: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        while len(outputs) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.05)
            except queue_module.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"a worker process died with exit code {dead[0].exitcode}"
                    ) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{world_size - len(outputs)} of {world_size} workers did not finish "
                        f"within {timeout} s"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"worker {rank} raised:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join()
        results.close()
        results.join_thread()
        del store  # closes the listening socket
    return [outputs[r] for r in range(world_size)]
