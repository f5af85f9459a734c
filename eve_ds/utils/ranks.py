"""Rank arithmetic that must agree with DeepSpeed's process-group layout, and the rank of this process."""

from __future__ import annotations


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process in the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """Rank within the expert-parallel group: DeepSpeed puts consecutive ranks in one expert-parallel group
    (`deepspeed.utils.groups._create_expert_and_data_parallel`), so global rank r holds the experts of
    expert-parallel rank r % ep_size. Computed, not asked of DeepSpeed, because it is needed before
    `deepspeed.initialize` creates the groups."""
    return rank % ep_size


def rank_slice(n: int) -> range:
    """The evaluation examples of this rank: every world-th, starting at its rank."""
    rank, world = rank_and_world()
    return range(rank, n, world)


def even_rank_slice(n: int) -> list[int]:
    """`rank_slice`, padded by wrapping around so that every rank gets ceil(n / world) examples: equal
    numbers of encoder passes, which expert parallelism needs (each MoE pass is collective). For results
    keyed by example (a repeated example gives the same result)."""
    _, world = rank_and_world()
    mine = list(rank_slice(n))
    return mine + [i % n for i in range(len(mine), -(-n // world))] if n else []


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (the one object outside torch.distributed)."""
    import torch.distributed as dist

    _, world = rank_and_world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out
