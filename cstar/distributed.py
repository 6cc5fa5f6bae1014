"""Multi-process runs (``torchrun``, DistributedDataParallel): one process per GPU.

``torchrun --nproc_per_node=N -m cstar train ...`` starts N processes and sets
``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_from_env` reads them and joins the process group (NCCL on CUDA,
Gloo on the CPU). Without them (or with ``WORLD_SIZE=1``) every helper here is
a cheap no-op, so the same code runs in one process unchanged.

Conventions of the distributed code paths in cstar:

- each rank trains on its own shard of the data (:func:`cstar.data.make_loader`
  with ``rank``/``world_size``); ``batch_size`` is per process, so the global
  batch is ``batch_size * world_size``;
- only rank 0 (:func:`is_main`) writes files and prints; all ranks run the same
  phases and agree on every control-flow decision (early stop, signals);
- adversarial examples are crafted with the plain module (:func:`unwrap`); only
  the training loss goes through the DDP wrapper (:func:`wrap`).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import nn

from ._core.errors import CstarError

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_MINUTES = 60


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size``, ``local_rank`` on its node, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


_context: Context | None = None


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise CstarError(f"environment variable {name}='{text}' is not an integer: launch with torchrun, "
                         "which sets it") from None


def init_from_env(device: str | torch.device = "cpu") -> Context:
    """Join the process group described by torchrun's environment variables; return the :class:`Context`.

    With ``WORLD_SIZE`` unset or 1 nothing is initialised (``Context(0, 1, 0, device)``).
    A CUDA ``device`` becomes ``cuda:LOCAL_RANK`` (and the current CUDA device;
    in one process ``cuda:N`` becomes the current device too). Collectives wait
    :func:`timeout` for the slowest rank.
    Calling it again returns the same context (with ``device`` mapped likewise).
    """
    global _context
    device = torch.device(device)
    if is_initialized():  # already joined (here, or by the caller's own init_process_group)
        if _context is None:
            _context = Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), device)
        _context = replace(_context, device=local_device(device))
        return _context
    world = _env_int("WORLD_SIZE") if os.environ.get("WORLD_SIZE") else 1
    if world <= 1:
        if device.type == "cuda" and device.index is not None:
            # else pinned-memory loaders and libraries that use "the current GPU" open a context on GPU 0
            torch.cuda.set_device(device)
        _context = Context(0, 1, 0, device)
        return _context
    missing = [name for name in _ENV if not os.environ.get(name)]
    if missing:
        raise CstarError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: launch with "
                         "'torchrun --nproc_per_node=N -m cstar ...' (or unset WORLD_SIZE for one process)")
    if not dist.is_available():
        raise CstarError(f"WORLD_SIZE={world} but this torch build has no torch.distributed: install a build "
                         "with distributed support, or run one process")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    backend = "gloo"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise CstarError(f"LOCAL_RANK={local_rank} but this node has {count} visible GPU(s): start at most "
                             f"{count} processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    options = {"timeout": timeout()}
    if backend == "nccl" and "device_id" in inspect.signature(dist.init_process_group).parameters:
        options["device_id"] = device  # binds the communicator to this GPU (no guessing in barrier())
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, **options)
    except (RuntimeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CstarError(f"could not join the {backend} process group of {world} processes at "
                         f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({reason}): check that every "
                         "node runs torchrun with the same --rdzv_endpoint/--nnodes and can reach it") from None
    _context = Context(rank, world, local_rank, device)
    return _context


def timeout() -> datetime.timedelta:
    """How long a collective waits for the slowest rank: ``CSTAR_DIST_TIMEOUT`` minutes (default 60).

    NCCL's own default (10 minutes) is shorter than a rank-0-only save of a
    large checkpoint or an uneven AutoAttack shard, after which the waiting
    ranks would abort.
    """
    text = os.environ.get("CSTAR_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_MINUTES))
    try:
        minutes = float(text)
    except ValueError:
        minutes = -1.0
    if not minutes > 0:
        raise CstarError(f"CSTAR_DIST_TIMEOUT='{text}' is not a positive number of minutes: set e.g. "
                         f"CSTAR_DIST_TIMEOUT={DEFAULT_TIMEOUT_MINUTES}, or unset it")
    return datetime.timedelta(minutes=minutes)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def is_main() -> bool:
    """True on rank 0, and whenever the run is not distributed: the process that writes files and prints."""
    return rank() == 0


def local_device(device: str | torch.device) -> torch.device:
    """``device``, with a CUDA device mapped to this process's GPU (``cuda:LOCAL_RANK``) when distributed."""
    device = torch.device(device)
    if device.type == "cuda" and is_distributed():
        local = _context.local_rank if _context is not None else int(os.environ.get("LOCAL_RANK", 0))
        return torch.device("cuda", local)
    return device


def _comm_device() -> torch.device:
    """Where tensors must live for collectives of this backend (NCCL: this GPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values):
    """Sum over ranks of a tensor (returned as a new tensor) or of a number or sequence of numbers.

    Numbers come back as the same kind (int or float, a list for a sequence);
    integers are summed exactly (up to 2**53). Identity when not distributed.
    """
    if torch.is_tensor(values):
        if not is_distributed():
            return values.clone()
        out = values.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out)
        return out.to(values.device)
    single = not isinstance(values, Sequence)
    items = [values] if single else list(values)
    if is_distributed():
        t = torch.tensor([float(v) for v in items], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        summed = [int(round(s)) if isinstance(v, int) and not isinstance(v, bool) else s
                  for v, s in zip(items, t.tolist())]
    else:
        summed = items
    return summed[0] if single else summed


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any: a decision all ranks agree on."""
    return bool(all_reduce_sum(int(bool(flag)))) if is_distributed() else bool(flag)


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor, in place, with rank ``src``'s (no-op when not distributed)."""
    if not is_distributed():
        return
    comm = _comm_device()
    for t in tensors:
        if t.device == comm and t.is_contiguous():
            dist.broadcast(t.data, src)
        else:  # NCCL takes only contiguous tensors on its GPU
            buf = t.detach().to(comm).contiguous()
            dist.broadcast(buf, src)
            t.data.copy_(buf)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value), on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (any picklable value), in rank order, on every rank: ``[obj]`` when not distributed."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when distributed (it broadcasts rank 0's weights); else ``model``.

    Gradients are averaged over ranks in ``backward``; BatchNorm buffers are
    broadcast from rank 0 at every forward (statistics are per rank unless the
    model uses SyncBatchNorm, see :func:`sync_batchnorm`).
    """
    if not is_distributed() or isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device], output_device=device)
    return nn.parallel.DistributedDataParallel(model)


@contextlib.contextmanager
def sync_batchnorm(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Swap ``model``'s BatchNorm layers for SyncBatchNorm (same parameters and buffers) for the block.

    Batch statistics are then computed over the global batch. The original
    layers are put back on exit, so the model saves and reloads as before.
    No-op when not ``enabled`` or not distributed. SyncBatchNorm needs CUDA.
    """
    swapped = []
    if enabled and is_distributed():
        if next(model.parameters()).device.type != "cuda":
            raise CstarError("sync_bn=True needs CUDA devices (SyncBatchNorm does not run on the CPU): "
                             "turn sync_bn off or train on GPUs")
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                    swapped.append((parent, name, child))
    try:
        yield model
    finally:
        for parent, name, child in reversed(swapped):
            child.train(getattr(parent, name).training)
            setattr(parent, name, child)


def shutdown() -> None:
    """Leave the process group (when one was joined)."""
    global _context
    if is_initialized():
        dist.destroy_process_group()
    _context = None
