"""Baseline for the Table 1 benchmark: masked image modeling with visual-token targets (BEiT style).

Every patch enters the encoder; the masked ones (40%, block-wise or random) have their embedding replaced by
the encoder's learned mask token, together with the complete text. A linear head predicts, at the masked
patches, the ids that a visual tokenizer gives the original image.

The tokenizer sits behind :class:`VisualTokenizer`. :class:`RandomCodebookTokenizer` (a fixed random
projection of the patches and the nearest entry of a fixed random codebook) stands in for a trained one
(DALL-E dVAE, VQ-KD) in the throughput benchmark: its targets carry no meaning, and a trained tokenizer's
forward pass (a frozen ViT for VQ-KD) would add to the cost measured with it.
"""

from __future__ import annotations

import math
import random
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eve_ds.models.config import EVEConfig
from eve_ds.models.eve import EVEModel
from eve_ds.objectives.base import ObjectiveConfig, register_objective
from eve_ds.objectives.masking import patchify


@runtime_checkable
class VisualTokenizer(Protocol):
    """images (B, C, H, W) -> token ids (B, P) in [0, vocab_size), patches in row-major grid order."""

    vocab_size: int

    def __call__(self, images: Tensor) -> Tensor: ...


class RandomCodebookTokenizer(nn.Module):
    """A stand-in tokenizer for timing: fixed random projection (p*p*C -> code_dim) of each patch, then the
    nearest (cosine) of `vocab_size` fixed random codes. Deterministic (seeded), no trainable parameters."""

    def __init__(
        self, patch_size: int, in_chans: int, vocab_size: int, code_dim: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        self.patch_size, self.vocab_size = patch_size, vocab_size
        gen = torch.Generator().manual_seed(seed)
        proj = torch.randn(patch_size**2 * in_chans, code_dim, generator=gen) / math.sqrt(code_dim)
        self.register_buffer("proj", proj, persistent=False)
        self.register_buffer(
            "codebook",
            F.normalize(torch.randn(vocab_size, code_dim, generator=gen), dim=-1),
            persistent=False,
        )

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        # fp32 whatever the engine cast the buffers to (bf16 would make near-ties pick other codes).
        z = patchify(images.float(), self.patch_size) @ self.proj.float()  # (B, P, code_dim)
        return (F.normalize(z, dim=-1) @ self.codebook.float().t()).argmax(-1)  # (B, P)


def block_mask(
    grid: int, num_masked: int, rng: random.Random, min_block: int = 16, max_attempts: int = 10
) -> list[bool]:
    """BEiT's block-wise masking of a grid x grid image: rectangles of >= min(min_block, num_masked)
    patches with aspect ratio in [0.3, 1/0.3] until `num_masked` patches are covered; the few patches the
    blocks may leave short are topped up at random, so that every image masks exactly `num_masked`.
    -> P booleans in row-major order."""
    mask = [[False] * grid for _ in range(grid)]
    count, lo = 0, min(min_block, num_masked)
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    while count < num_masked:
        left = num_masked - count
        delta = 0
        for _ in range(max_attempts):
            area = rng.uniform(min(lo, left), left)
            aspect = math.exp(rng.uniform(*log_ratio))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 1 <= h < grid and 1 <= w < grid:
                top, lft = rng.randint(0, grid - h), rng.randint(0, grid - w)
                new = sum(not mask[i][j] for i in range(top, top + h) for j in range(lft, lft + w))
                if 0 < new <= left:
                    for i in range(top, top + h):
                        for j in range(lft, lft + w):
                            mask[i][j] = True
                    delta = new
                    break
        if delta == 0:
            break
        count += delta
    flat = [m for row in mask for m in row]
    free = [i for i, m in enumerate(flat) if not m]
    for i in rng.sample(free, num_masked - count):
        flat[i] = True
    return flat


def token_mim_mask(
    batch_size: int,
    grid: int,
    ratio: float,
    mode: str,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> Tensor:
    """-> (B, P) bool, exactly round(ratio * P) True per row (block-wise as BEiT, or uniformly random).

    Block masks are drawn on the host (as BEiT's data loader does) from a seed taken from `generator`.
    """
    P = grid * grid
    n = max(1, round(ratio * P))
    if mode == "random":
        noise = torch.rand(batch_size, P, device=device, generator=generator)
        return noise.argsort(1).argsort(1) < n
    gen_device = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=gen_device).item())
    rng = random.Random(seed)
    rows = [block_mask(grid, n, rng) for _ in range(batch_size)]
    return torch.tensor(rows, dtype=torch.bool).to(device, non_blocking=True)


@register_objective("mim_token")
class TokenMaskedImageModeling(nn.Module):
    """All patches + complete text enter the encoder, `mim_token_mask_ratio` of the patches as the learned
    mask token; cross-entropy on the visual-token ids of the masked patches only."""

    uses_image_mask_token = True

    def __init__(
        self, model_cfg: EVEConfig, obj_cfg: ObjectiveConfig, tokenizer: VisualTokenizer | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.model_cfg = obj_cfg, model_cfg
        self.tokenizer = tokenizer or RandomCodebookTokenizer(
            model_cfg.patch_size, model_cfg.in_chans, obj_cfg.mim_token_vocab_size
        )
        self.head = nn.Linear(model_cfg.hidden_size, self.tokenizer.vocab_size)
        nn.init.trunc_normal_(self.head.weight, std=model_cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, encoder: EVEModel, batch: dict, generator: torch.Generator | None) -> dict:
        image = batch["image"]
        # A data pipeline may draw the masks on its workers, as BEiT's does: batch["mim_token_mask"].
        mask = batch.get("mim_token_mask")
        if mask is None:
            mask = token_mim_mask(
                image.shape[0],
                self.model_cfg.grid_size,
                self.cfg.mim_token_mask_ratio,
                self.cfg.mim_token_masking,
                image.device,
                generator,
            )  # (B, P)
        with torch.no_grad():
            target = self.tokenizer(image)[mask]  # (M,)
        enc = encoder(
            image,
            batch["text_ids"],
            batch["text_mask"],
            patch_mask=mask,
            has_padding=batch.get("text_padded"),
            text_real=batch.get("text_real"),
        )
        logits = self.head(enc.image[:, 1:][mask]).float()  # (M, V): masked patches only
        return {
            "mim_token_loss": F.cross_entropy(logits, target),
            "mim_token_acc": (logits.argmax(-1) == target).float().mean().detach(),
            "encoder_outputs": [enc],
        }
