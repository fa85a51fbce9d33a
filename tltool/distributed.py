"""Data-parallel training under torchrun (PyTorch's own launcher and DistributedDataParallel).

    torchrun --nproc-per-node N -m tltool pretrain | freeze-finetune | extract CONFIG
    torchrun --nproc-per-node N -m tltool evaluate | predict RUN ...

torchrun starts N processes and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; tltool then
joins the process group (gloo on the CPU, nccl on CUDA GPUs, one GPU per local rank). What each
rank does:

- every rank reads the data and draws the same epoch order (the same seed), and takes its
  contiguous share of each global batch of `train.batch_size` rows; its loss is its rows' share
  of the global batch's mean, so DDP's gradient average equals the one-process gradient of the
  whole batch (class weights included);
- DDP wraps only what trains: the frozen prefix runs (or is read from its cache) outside it;
- validation (and every other inference: test scores, evaluate, predict) is split into
  contiguous shares, one per rank, and the logits are gathered in row order (all_gather), so
  every rank holds the same full predictions and decides early stopping and the threshold
  identically without a further message;
- only rank 0 writes the run folder; the other ranks write into a private temporary folder
  that is removed at the end.

Same answer at any scale: with the same global batch, N processes and one process train to the
same weights up to floating-point summation order (a test compares 2 gloo processes with 1),
provided nothing random depends on the rank: dropout draws its masks per process, and
BatchNorm in training mode normalises each rank's rows (bn_policy train: SyncBatchNorm), so
those give statistically equivalent, not identical, runs.

`evaluate`, `predict` and `extract` run data-parallel too, the same way; rank 0 writes the run
folder, any --out file and extract's feature files (and fits extract's sklearn heads, after the
other ranks have left). Row by row the logits and features are the ones one process computes
(inference mode, no randomness), up to the summation order of a different batch composition.

The data path is split the same way: image files decoded once at load time are decoded in
contiguous shares (one per rank) and gathered, so every rank holds all pixels after 1/N of the
decoding (the decoded-image cache is written by local rank 0 of each machine and used only
when every rank finds it); a frozen prefix cache is built on each rank's share and gathered.

Pooled source rows split the same way (a global batch mixes both domains as in one
process). `adapt` runs every rank on its share of the labelled, source and unlabelled target
batches and gathers their features with gradients (`gather_rows_with_grad`), so the alignment
loss is the one-process loss; its steps average the gradients themselves
(`average_gradients`), since they call the backbone outside DistributedDataParallel.

Not data-parallel (refused with a clear error under torchrun): `select` (run it as one
process).
"""

from __future__ import annotations

import functools
import os
from typing import Any

from tltool.errors import ConfigError

DISTRIBUTED_COMMANDS = ("pretrain", "freeze-finetune", "resume", "evaluate", "predict",
                        "extract")


def launched() -> bool:
    """Started by torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def active() -> bool:
    if not launched():
        return False  # torch is not even imported for a one-process command
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    if not active():
        return 0
    import torch

    return torch.distributed.get_rank()


def world() -> int:
    if not active():
        return 1
    import torch

    return torch.distributed.get_world_size()


def local_rank() -> int:
    """This process's rank on its machine (0 without torchrun)."""
    if not active():
        return 0
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init(command: str) -> None:
    """Join the process group torchrun prepared (once); refuse commands that are not
    data-parallel."""
    if not launched() or active():
        return
    if command not in DISTRIBUTED_COMMANDS:
        raise ConfigError(f"{command} does not run data-parallel under torchrun yet; run it as "
                          f"one process (data-parallel: {', '.join(DISTRIBUTED_COMMANDS)})")
    import datetime

    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=10))


def sharded_inference(n: int) -> bool:
    """Whether inference over n rows is split across the ranks (every data-parallel command:
    validation, test scores, evaluate, predict): each rank predicts its contiguous share and
    the logits are gathered on every rank. Fewer rows than ranks: every rank predicts all."""
    return active() and n >= world()


def _share_sizes(n: int) -> list[int]:
    """Rows of each rank's contiguous share of n rows (sizes differ by at most one)."""
    base, extra = divmod(n, world())
    return [base + (1 if r < extra else 0) for r in range(world())]


def rows_of_rank(n: int) -> tuple[int, int]:
    """[start, stop) of this rank's contiguous share of n rows."""
    sizes = _share_sizes(n)
    start = sum(sizes[:rank()])
    return start, start + sizes[rank()]


def gather_rows(part, n: int, sizes: list[int] | None = None):
    """The ranks' contiguous shares (in rank order) as one tensor of n rows, on every rank.
    `sizes`: each rank's row count when the shares are not `rows_of_rank`'s (their sum is n).
    Half-precision rows travel as bytes (gloo gathers neither bfloat16 nor int16)."""
    import torch

    sizes = sizes or _share_sizes(n)
    device = torch.device("cuda") if torch.distributed.get_backend() == "nccl" else part.device
    wire = part
    if part.dtype in (torch.bfloat16, torch.float16):
        wire = part.contiguous().unsqueeze(-1).view(torch.uint8)
    padded = torch.zeros((max(sizes), *wire.shape[1:]), dtype=wire.dtype, device=device)
    padded[:len(wire)] = wire.to(device)
    bufs = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(bufs, padded)
    out = torch.cat([b[:k] for b, k in zip(bufs, sizes, strict=True)]).to(part.device)
    return out.view(part.dtype).squeeze(-1) if out.dtype != part.dtype else out


@functools.cache
def _gather_with_grad():
    """An autograd Function: forward `gather_rows`; backward the gradient of the gathered rows
    summed over the ranks (an all_reduce, which gloo has), sliced to this rank's rows."""
    import torch

    class GatherRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, n):
            ctx.lo, ctx.hi = rows_of_rank(n)
            return gather_rows(x.detach(), n)

        @staticmethod
        def backward(ctx, grad):
            grad = grad.contiguous().clone()
            torch.distributed.all_reduce(grad)
            return grad[ctx.lo:ctx.hi], None

    return GatherRows


def gather_rows_with_grad(part, n: int):
    """`gather_rows` for a tensor that needs gradients (features of this rank's share of a
    global batch of n rows, `share`'s split): every rank gets all n rows; the gradient of a
    loss computed on them, identical on every rank, flows back to each rank's own rows as the
    sum over the ranks (each rank then carries `world` times its rows' gradient, which
    `average_gradients` divides back)."""
    return _gather_with_grad().apply(part, n)


def average_gradients(optimizer) -> None:
    """The mean over the ranks of every gradient the optimiser will apply (one all_reduce of
    a flat buffer), for steps that do not run through DistributedDataParallel."""
    import torch

    grads = [p.grad for group in optimizer.param_groups for p in group["params"]
             if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_objects(value: Any) -> list[Any]:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    import torch

    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, value)
    return out


def share(idx):
    """This rank's contiguous share of a global batch (sizes differ by at most one row)."""
    if not active():
        return idx
    import torch

    return torch.tensor_split(idx, world())[rank()]


def total(value: float) -> float:
    """The sum of `value` over the ranks (itself in one process)."""
    if not active():
        return value
    import torch

    t = torch.tensor([value], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return float(t[0])


def wrap(module, device) -> Any:
    """`module` under DistributedDataParallel (its trainable parameters only), or as it is."""
    if not active() or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def release() -> None:
    """Every rank is past its last collective: leave the process group now, so that what
    follows (rank 0's own work, e.g. fitting extract's sklearn heads) waits on no other rank
    and no collective timeout."""
    finish()


def sync_batchnorm(model, device, wanted: bool) -> str | None:
    """Under torchrun on GPUs, turn the model's BatchNorm layers into PyTorch's SyncBatchNorm
    (in place: same parameters and buffers), so that layers in training mode normalise over
    the global batch and N processes train like one. Returns a warning when it cannot: PyTorch's
    SyncBatchNorm runs on GPUs only, so on CPUs (gloo) each rank normalises its own rows."""
    if not active() or not wanted:
        return None
    from torch import nn

    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if not any(isinstance(m, norms) for m in model.modules()):
        return None
    if device.type != "cuda":
        return ("train.sync_batchnorm: PyTorch's SyncBatchNorm needs GPUs; on CPUs each rank's "
                "BatchNorm layers in training mode normalise that rank's rows only (results "
                "statistically equivalent to one process, not identical)")
    # PyTorch's converter makes new modules; the model's lists of frozen modules and of norms
    # that adapt (tltool.freeze) must point at the new ones, or model.train() would put a
    # frozen layer's replacement in training mode
    swapped: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, norms) and not isinstance(child, nn.SyncBatchNorm):
                new = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                new.train(child.training)
                setattr(parent, name, new)
                swapped[id(child)] = new
    for attr in ("frozen_modules", "adapting_norms"):
        if isinstance(getattr(model, attr, None), list):
            setattr(model, attr, [swapped.get(id(m), m) for m in getattr(model, attr)])
    return None


def finish() -> None:
    if active():
        import torch

        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
