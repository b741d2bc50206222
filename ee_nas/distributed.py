"""Rank-safe helpers for DDP runs: who writes, how results are shared, how the search work is split.

Every rank runs the same code. Under DDP (`trainer=ddp`, CPU/gloo or GPUs/nccl, or SLURM tasks)
the process group Lightning set up for training stays alive after `trainer.fit`, so the
post-fit stages use it too: the search splits each generation's candidates across ranks and
gathers the scores (every rank then holds the same archive); rank 0 writes every file and
computes the final report, the other ranks wait and receive its result.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)

#: the environment variables a launcher sets for each process (Lightning's own order, see rank_zero_only)
_RANK_VARS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def process_rank() -> int:
    """This process's global rank before any trainer exists: 0 unless a DDP launcher (Lightning's
    subprocess launcher, torchrun, srun) started it as another rank."""
    for var in _RANK_VARS:
        if os.environ.get(var) is not None:
            return int(os.environ[var])
    return 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else 0


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (one element outside DDP)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def share(obj, src: int = 0):
    """Rank `src`'s `obj` on every rank (the object itself outside DDP)."""
    if world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


class RankZeroFailed(RuntimeError):
    """Rank 0 failed in a stage the other ranks were waiting for."""


def on_rank_zero(fn: Callable):
    """`fn()` on rank 0 only, its result on every rank (the others wait). An error on rank 0 is raised
    there as it is and as `RankZeroFailed` on the other ranks, so none waits forever."""
    if world_size() == 1:
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except BaseException as err:
            error = err
    failure, result = share((None if error is None else f"{type(error).__name__}: {error}", result))
    if error is not None:
        raise error
    if failure is not None:
        raise RankZeroFailed(f"rank 0 failed: {failure}")
    return result


def split_by_cost(costs: Sequence[float], n_shares: int) -> list[list[int]]:
    """Indices of `costs` in `n_shares` shares of about equal total cost (longest first, to the lightest
    share; ties by index), the same on every rank. Candidates differ several-fold in cost (depth,
    width, number of exits), so a round-robin split leaves one rank waiting on the other."""
    shares: list[list[int]] = [[] for _ in range(n_shares)]
    load = [0.0] * n_shares
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        k = min(range(n_shares), key=lambda s: (load[s], s))
        shares[k].append(i)
        load[k] += float(costs[i])
    return [sorted(s) for s in shares]


def distributed_batch(evaluate_one: Callable, cost: Callable | None = None) -> Callable[[list], list]:
    """`evaluate_batch(items) -> results` (in the order of `items`) that scores this rank's share of
    `items` with `evaluate_one` and gathers the others' shares; outside DDP a plain loop.

    Every rank must pass the same `items` (they run the same seeded search): that is checked, since
    ranks that diverged would pair scores with the wrong candidates. `cost(item)` balances the shares.
    """
    def evaluate_batch(items: list) -> list:
        n = world_size()
        if n == 1 or len(items) == 0:
            return [evaluate_one(item) for item in items]
        keys = [getattr(item, "key", lambda: repr(item))() for item in items]
        if any(k != keys for k in gather(keys)):
            raise RuntimeError("the DDP ranks hold different candidates to evaluate: the search diverged "
                               "between ranks (it must be seeded the same way on every rank)")
        shares = split_by_cost([cost(item) for item in items] if cost else [1.0] * len(items), n)
        log.info("rank %d scores %d of %d candidates", rank(), len(shares[rank()]), len(items))
        mine = {i: evaluate_one(items[i]) for i in shares[rank()]}
        results: list = [None] * len(items)
        for part in gather(mine):
            for i, result in part.items():
                results[i] = result
        return results

    return evaluate_batch


def check_trainer_config(cfg: DictConfig) -> None:
    """`trainer.sync_batchnorm=true` stops here with the key named, not in DDP's setup or training:
    `SyncBatchNorm.convert_sync_batchnorm` turns every `_BatchNorm` into a fixed-width SyncBatchNorm,
    the supernet's ElasticBatchNorm2d layers too (their active-width forward and `extract` are lost),
    and on CPU there is no SyncBatchNorm (conf/trainer/ddp.yaml)."""
    from ee_nas.config import ConfigError

    if cfg.trainer.get("sync_batchnorm", False):
        raise ConfigError("config error: trainer.sync_batchnorm=true is not supported: SyncBatchNorm would replace "
                          "the supernet's elastic BatchNorm layers (ElasticBatchNorm2d) by fixed-width ones, and it "
                          "has no CPU implementation. Set trainer.sync_batchnorm=false (per-rank statistics; every "
                          "subnet's BatchNorm is recalibrated after training)")
