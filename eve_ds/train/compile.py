"""`train.compile=blocks`: each encoder block that runs without a host sync is compiled on its own with
`torch.compile(fullgraph=True, dynamic=False)` (torchtitan's per-block compile), in place, so parameter
names and checkpoints do not change.

Which blocks: every hard-router block, and the soft-router blocks with `model.moe_dispatch=grouped` in
bf16 / fp16. DeepSpeed's MoE layer reads each expert's capacity to the host (`int(C)`), a graph break, so
those soft blocks stay eager; torch 2.14 cannot trace `torch._grouped_mm` in float32 (its meta kernel takes
bf16 / fp16 only), so an fp32 run keeps the grouped soft blocks eager too.

Shapes are static (`dynamic=False`): one graph per block, encoder pass (the MLM pass's full image, the
MIM pass's kept patches, text alone) and train / eval mode, compiled on the first step and reused. Text
lengths must not vary for that: the trainer pads every training batch's captions to `model.max_text_len`
(`eve_ds.data.transforms.pad_text`) when blocks are compiled (`train.static_text_len`). The alternative, a dynamic text dimension,
gives kernels with symbolic sizes and rules out CUDA graphs; the fixed length costs the padded
tokens' compute instead. Blocks whose drop-path rates differ (`drop_path_rate > 0`) get their own graphs,
as dynamo specialises on the rate.

CUDA graphs: `train.compile_mode=reduce-overhead` hands each compiled block to Inductor's CUDA-graph trees,
which record the block's kernels once per shape and replay them (launch overhead gone; the eager blocks and
DeepSpeed's step stay as they are). `default` is the off switch; a CPU run ignores the mode.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from eve_ds.models.layers import Block

logger = logging.getLogger(__name__)

# Graphs one block's forward may need: encoder passes (image + text, kept patches + text, text alone, image
# alone) x train / eval mode. Dynamo's limit counts the entries of Block.forward's code, shared by all blocks.
GRAPHS_PER_BLOCK = 8


def static_text_len(train) -> bool:
    """Whether the trainer pads captions to max_text_len: train.static_text_len, by default with compile."""
    if train.static_text_len is None:
        return train.compile == "blocks"
    return train.static_text_len


def block_compiles(block: Block) -> bool:
    """Whether the block's forward is one graph without host syncs (see the module docstring)."""
    if not block.soft:
        return True
    dtype = next(block.ffn.parameters()).dtype
    return block.ffn.dispatch == "grouped" and dtype in (torch.bfloat16, torch.float16)


def compile_blocks(
    model: nn.Module, backend: str = "inductor", mode: str = "default"
) -> dict[str, list[int]]:
    """Compile, in place, every encoder block of `model` that `block_compiles`; call it after the model has
    its training dtype (after `deepspeed.initialize`). `mode`: Inductor's (`train.compile_mode`;
    reduce-overhead records each block's kernels as a CUDA graph). -> {"compiled": block indices, "eager":
    the others}."""
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError("train.compile=blocks: the model has no encoder blocks to compile")
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, GRAPHS_PER_BLOCK * len(blocks))
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, config.recompile_limit)
    out: dict[str, list[int]] = {"compiled": [], "eager": []}
    for i, block in enumerate(blocks):
        if block_compiles(block):
            block.compile(
                fullgraph=True, dynamic=False, backend=backend, mode=None if mode == "default" else mode
            )
            out["compiled"].append(i)
        else:
            out["eager"].append(i)
    logger.info(
        "torch.compile (%s, mode %s): blocks %s compiled, %s eager",
        backend,
        mode,
        out["compiled"],
        out["eager"],
    )
    return out
