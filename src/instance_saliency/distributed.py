"""Running under ``torchrun``: which rank this process is, its device, and the process group.

``torchrun --nproc-per-node G [--nnodes N ...] -m instance_saliency COMMAND ...`` starts one
process per rank and tells each, in its environment, ``RANK`` (0 .. WORLD_SIZE - 1 over all
nodes), ``WORLD_SIZE``, ``LOCAL_RANK`` (0 .. G - 1 on its node) and ``MASTER_ADDR`` /
``MASTER_PORT`` (where the ranks meet). :class:`World` reads them (one process without them),
:meth:`World.device` maps ``--device cuda`` to the rank's GPU ``cuda:LOCAL_RANK``, and
:func:`process_group` opens the ``torch.distributed`` process group with a timeout, so that no
rank waits forever for another, and keeps it open for later calls in the same process (the
command line closes it when its command ends, :func:`close_process_group`; otherwise it is
closed at exit).

The timeout of every wait (joining, barriers, gathers) is ``INSTANCE_SALIENCY_DIST_TIMEOUT``
seconds when that variable is set, else the caller's default (``cohort``: one day, since ranks
finish their shares at different times; ``train``: 30 minutes, since ranks wait only for
rank 0's validation and checkpoint writing). A rank that exits makes torchrun stop the others on
its node; on other nodes the broken connection ends their waits.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from .errors import DistributedError, InputError

__all__ = ["World", "Group", "process_group", "close_process_group", "timeout_s",
           "TIMEOUT_ENV"]

#: environment variable: seconds any rank waits for the others (joining, barriers, gathers)
TIMEOUT_ENV = "INSTANCE_SALIENCY_DIST_TIMEOUT"


def _env_int(environ, name: str) -> int | None:
    v = environ.get(name)
    if v is None or not str(v).strip():
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"{name}={v!r} is not an integer (set by torchrun; do not set "
                               f"it by hand)") from None


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a ``torchrun`` launch.

    Attributes
    ----------
    rank : int
        Global rank, ``0 <= rank < size`` (``RANK``).
    size : int
        Number of ranks over all nodes (``WORLD_SIZE``); 1 without torchrun.
    local_rank : int
        Rank on this node (``LOCAL_RANK``), the index of its GPU.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, environ=None) -> "World":
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (as torchrun sets them).

        Parameters
        ----------
        environ : mapping, optional
            Default ``os.environ``.

        Returns
        -------
        World
            ``World(0, 1, 0)`` when ``WORLD_SIZE`` is not set.

        Raises
        ------
        DistributedError
            A value is not an integer, ``RANK`` is missing or out of ``[0, WORLD_SIZE)``, or
            ``LOCAL_RANK`` is negative.
        """
        environ = os.environ if environ is None else environ
        size = _env_int(environ, "WORLD_SIZE")
        if size is None:
            return cls()
        rank = _env_int(environ, "RANK")
        local = _env_int(environ, "LOCAL_RANK")
        if size < 1:
            raise DistributedError(f"WORLD_SIZE={size} must be at least 1")
        if rank is None:
            if size == 1:
                return cls()
            raise DistributedError(f"WORLD_SIZE={size} but RANK is not set; start the ranks "
                                   f"with torchrun")
        if not 0 <= rank < size:
            raise DistributedError(f"RANK={rank} is outside 0..{size - 1} (WORLD_SIZE={size})")
        if local is None:
            local = rank
        if local < 0:
            raise DistributedError(f"LOCAL_RANK={local} must not be negative")
        return cls(rank, size, local)

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files and runs the analysis."""
        return self.rank == 0

    @property
    def shard(self) -> tuple:
        """This rank's share of a list as ``--shard i/n`` takes it: ``(rank + 1, size)``."""
        return self.rank + 1, self.size

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.size}"

    def device(self, requested: str) -> str:
        """The torch device of this rank for a ``--device`` value.

        ``cuda`` becomes ``cuda:LOCAL_RANK`` when there are several ranks (each rank its own
        GPU); every other value is returned as it is (``cpu`` stays on the CPU).

        Parameters
        ----------
        requested : str
            The ``--device`` value, e.g. ``"cpu"`` or ``"cuda"``.

        Returns
        -------
        str

        Raises
        ------
        InputError
            Several ranks with an indexed GPU (``cuda:1``: all ranks of a node would share
            it), or ``LOCAL_RANK`` has no GPU of its own on this node.
        """
        if not self.distributed:
            return requested
        import torch

        try:
            dev = torch.device(requested)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"unknown --device {requested!r} ({str(e).splitlines()[0]})"
                             ) from None
        if dev.type != "cuda":
            return requested
        if dev.index is not None:
            raise InputError(f"--device {requested} under torchrun: give --device cuda, each "
                             f"rank then uses cuda:LOCAL_RANK")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError("--device cuda, but no CUDA GPU is visible on this node; use "
                             "--device cpu")
        if self.local_rank >= n:
            raise InputError(f"{self}: LOCAL_RANK {self.local_rank} has no GPU of its own "
                             f"({n} visible on this node); use --nproc-per-node {n} or fewer, "
                             f"or --device cpu")
        return f"cuda:{self.local_rank}"


def timeout_s(default: float) -> float:
    """Seconds a rank waits for the others: ``$INSTANCE_SALIENCY_DIST_TIMEOUT`` or ``default``.

    Raises
    ------
    InputError
        The variable is set but not a positive number.
    """
    v = os.environ.get(TIMEOUT_ENV, "").strip()
    if not v:
        return float(default)
    try:
        t = float(v)
    except ValueError:
        t = float("nan")
    if not (t > 0 and t < float("inf")):
        raise InputError(f"{TIMEOUT_ENV}={v!r} must be a positive number of seconds")
    return t


class Group:
    """The process group of a distributed run, or a stand-in for a single process.

    With one rank every method returns at once (``all_gather`` gives ``[obj]``).

    Attributes
    ----------
    world : World
    backend : str or None
        ``"gloo"`` or ``"nccl"``; None for a single process.
    """

    def __init__(self, world: World, backend: str | None = None, device: str = "cpu"):
        self.world = world
        self.backend = backend
        self._device = device

    def barrier(self) -> None:
        """Wait until every rank has called it (at most the group's timeout)."""
        if self.backend:
            import torch.distributed as dist

            try:
                dist.barrier()
            except RuntimeError as e:
                raise _wait_error(self.world, "at a barrier", e) from None

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank.

        Raises
        ------
        DistributedError
            A rank did not answer within the timeout, or its connection broke.
        """
        if not self.backend:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world.size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:
            raise _wait_error(self.world, "while gathering the ranks' results", e) from None
        return out

    def broadcast(self, obj, src: int = 0):
        """``obj`` of rank ``src`` (picklable), on every rank."""
        if not self.backend:
            return obj
        import torch.distributed as dist

        box = [obj]
        try:
            dist.broadcast_object_list(box, src=src)
        except RuntimeError as e:
            raise _wait_error(self.world, f"while waiting for rank {src}", e) from None
        return box[0]

    def mean(self, value):
        """Mean of a scalar tensor over the ranks (a float; the value itself for one rank)."""
        if not self.backend:
            return float(value)
        import torch
        import torch.distributed as dist

        t = torch.as_tensor(value, dtype=torch.float64, device=self._device).detach().clone()
        dist.all_reduce(t)
        return float(t) / self.world.size


def _wait_error(world: World, what: str, e: Exception) -> DistributedError:
    msg = " ".join(str(e).split())[:300]
    return DistributedError(f"{world}: another rank did not answer {what} (it failed, was "
                            f"killed, or took longer than the {TIMEOUT_ENV} timeout): {msg}")


@contextmanager
def process_group(world: World, device: str = "cpu", timeout: float = 1800.0,
                  backend: str | None = None):
    """The ``torch.distributed`` process group of ``world``: opened on the first call and kept
    open, for later calls in the same process, until the process exits.

    Parameters
    ----------
    world : World
        With one rank nothing is opened and a stand-in :class:`Group` is yielded.
    device : str
        This rank's device: the backend is NCCL for a CUDA device, gloo otherwise.
    timeout : float
        Seconds any rank waits for the others (joining, barriers, gathers); see
        :func:`timeout_s`.
    backend : {"gloo", "nccl"}, optional
        Overrides the choice by device (gloo suits a few small messages from CPU memory).

    Yields
    ------
    Group

    Raises
    ------
    DistributedError
        The ranks cannot meet (no ``MASTER_ADDR`` / ``MASTER_PORT``, not all ranks joined
        within the timeout), or a group already open has another size.

    Notes
    -----
    A group that is already open (opened by an earlier call, or by a script that called
    ``init_process_group`` itself) is used as it is, with its backend and timeout. The group
    is not closed and reopened between calls (two trainings in one ``torchrun`` launch):
    torch names a reopened default group like the first one (its group counter restarts at 0
    on ``destroy_process_group``), so the ranks' gloo rendezvous would read the first group's
    addresses, still in torchrun's store, and some runs hung at the start of the second
    training. The command line closes it when its command ends (:func:`close_process_group`);
    otherwise the same function, registered with :mod:`atexit`, closes it when the process
    ends.
    """
    if not world.distributed:
        yield Group(world)
        return
    import torch
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    backend = backend or ("nccl" if cuda else "gloo")
    if dist.is_initialized():
        if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
            raise DistributedError(f"a process group of {dist.get_world_size()} rank(s) is "
                                   f"already open, but WORLD_SIZE is {world.size}")
        yield Group(world, dist.get_backend(), device if dist.get_backend() == "nccl"
                    else "cpu")
        return
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise DistributedError(f"WORLD_SIZE={world.size} but {name} is not set; start the "
                                   f"ranks with torchrun")
    kw = {}
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
        kw["device_id"] = torch.device(device)
    try:
        dist.init_process_group(backend, init_method="env://", rank=world.rank,
                                world_size=world.size, timeout=timedelta(seconds=timeout), **kw)
    except (RuntimeError, ValueError) as e:
        msg = " ".join(str(e).split())[:300]
        raise DistributedError(f"{world}: cannot join the other ranks ({backend}): {msg}"
                               ) from None
    global _CLOSE_REGISTERED, _OPENED
    _OPENED = True
    if not _CLOSE_REGISTERED:
        atexit.register(close_process_group)
        _CLOSE_REGISTERED = True
    yield Group(world, backend, device if backend == "nccl" else "cpu")


#: whether :func:`close_process_group` is registered with atexit (once per process)
_CLOSE_REGISTERED = False
#: whether the open group is one :func:`process_group` opened (a script's own is left open)
_OPENED = False


def close_process_group() -> None:
    """Close the ``torch.distributed`` process group that :func:`process_group` opened, if
    one is open (a no-op otherwise: a group a script opened itself is left to it).

    Registered with :mod:`atexit` when a group is opened. The command line also calls it when
    a command ends, on every rank at the same point, so that no gloo worker thread outlives
    the interpreter: after a ``train`` under ``torchrun`` that left the group to the exit
    handler, one rank of one CI run aborted at exit ("terminate called without an active
    exception") with its outputs all written. Objects in reference cycles that hold the group
    (a DistributedDataParallel wrapper) are collected first, while the interpreter is whole.
    """
    global _OPENED
    dist = sys.modules.get("torch.distributed")
    if not _OPENED or dist is None or not dist.is_available() or not dist.is_initialized():
        return
    import gc

    _OPENED = False

    gc.collect()
    dist.destroy_process_group()
    gc.collect()
