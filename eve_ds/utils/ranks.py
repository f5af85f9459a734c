"""Rank arithmetic that must agree with DeepSpeed's process-group layout."""

from __future__ import annotations


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """Rank within the expert-parallel group: DeepSpeed puts consecutive ranks in one expert-parallel group
    (`deepspeed.utils.groups._create_expert_and_data_parallel`), so global rank r holds the experts of
    expert-parallel rank r % ep_size. Computed, not asked of DeepSpeed, because it is needed before
    `deepspeed.initialize` creates the groups."""
    return rank % ep_size
