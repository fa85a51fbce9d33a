"""Data-parallel training under torchrun (PyTorch's own launcher and DistributedDataParallel).

    torchrun --nproc-per-node N -m tltool pretrain | freeze-finetune CONFIG

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

`evaluate` and `predict` run data-parallel too, the same way; rank 0 writes the run folder and
any --out file. Row by row the logits are the ones one process computes (inference mode, no
randomness), up to the summation order of a different batch composition.

Not data-parallel yet (refused with a clear error under torchrun): pooled source rows,
`adapt`, `select`, `extract` (run those as one process).
"""

from __future__ import annotations

import os
from typing import Any

from tltool.errors import ConfigError

DISTRIBUTED_COMMANDS = ("pretrain", "freeze-finetune", "resume", "evaluate", "predict")


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


def gather_rows(part, n: int):
    """The ranks' contiguous shares (in rank order) as one tensor of n rows, on every rank."""
    import torch

    sizes = _share_sizes(n)
    device = torch.device("cuda") if torch.distributed.get_backend() == "nccl" else part.device
    padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=part.dtype, device=device)
    padded[:len(part)] = part.to(device)
    bufs = [torch.empty_like(padded) for _ in sizes]
    torch.distributed.all_gather(bufs, padded)
    return torch.cat([b[:k] for b, k in zip(bufs, sizes, strict=True)]).to(part.device)


def check_route(pooled: bool, adapt: bool) -> None:
    if not active():
        return
    if pooled:
        raise ConfigError("train.source_weight: pooled source rows do not run data-parallel "
                          "under torchrun yet; run as one process")
    if adapt:
        raise ConfigError("adapt: domain adaptation does not run data-parallel under torchrun "
                          "yet; run as one process")


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


def finish() -> None:
    if active():
        import torch

        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
