"""EVE: one shared Transformer over [image; text] tokens (paper Sec. 3.1)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from timm.layers import PatchEmbed, trunc_normal_
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from eve_ds.models.config import EVEConfig
from eve_ds.models.layers import (
    Block,
    SoftRouterFFN,
    Tokens,
    init_weights,
    padding_bias,
    padding_block_mask,
    padding_fill,
)
from eve_ds.models.weights import load_state_dict_strict, read_native_export


@dataclass
class EncoderOutput:
    """hidden: (B, N, D) after the final norm, tokens ordered [image cls; patches; text].

    aux_loss: sum of the soft-router blocks' load-balancing losses (eq. 7 without α) of this call.
    expert_counts: {block index: (2, E) routes to each expert from image (row 0) and text (row 1) tokens}.
    """

    hidden: Tensor
    n_image: int
    aux_loss: Tensor
    expert_counts: dict[int, Tensor] = field(default_factory=dict)
    pre_norm: Tensor | None = None  # (B, N, D) the last block's output, before the final norm

    @property
    def image(self) -> Tensor:
        return self.hidden[:, : self.n_image]

    @property
    def text(self) -> Tensor:
        return self.hidden[:, self.n_image :]


def sincos_pos_embed_2d(dim: int, grid: int, temperature: float = 10000.0) -> Tensor:
    """MAE's fixed 2-D sin-cos position embedding -> (grid * grid, dim), row-major patches: the first half of
    the channels encodes the column (x), the second half the row (y), each as [sin | cos] over dim / 4
    frequencies 1 / temperature^(k / (dim / 4))."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    y, x = torch.meshgrid(coords, coords, indexing="ij")

    def encode(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(x), encode(y)], dim=1).float()


class EVEModel(nn.Module):
    """Embeddings (eq. 1-3) + blocks (hard router below, soft router on `cfg.soft_blocks`) + final norm."""

    def __init__(self, cfg: EVEConfig, image_mask_token: bool = False) -> None:
        """image_mask_token: add a learned `mask_token` that replaces masked patch embeddings
        (`forward(patch_mask=...)`, BEiT-style MIM); off by default so that MSM checkpoints are unchanged."""
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embed = PatchEmbed(cfg.image_size, cfg.patch_size, cfg.in_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d)) if image_mask_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, d))
        self.word_embed = nn.Embedding(cfg.vocab_size, d, padding_idx=cfg.pad_token_id)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, cfg.max_text_len, d))
        self.type_embed = nn.Embedding(2, d)  # 0: image, 1: text
        # Optional norms of the official release's model (model.text_embed_norm / embed_norm); absent by
        # default so that the state dict and the numerics stay those of the paper's model.
        self.text_embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.text_embed_norm else None
        self.text_embed_drop = nn.Dropout(cfg.text_embed_dropout) if cfg.text_embed_dropout > 0 else None
        self.embed_norm = nn.LayerNorm(d, eps=cfg.norm_eps) if cfg.embed_norm else None
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.num_layers, device="cpu").tolist()
        soft = set(cfg.soft_blocks)
        self.blocks = nn.ModuleList(Block(cfg, i in soft, dpr[i]) for i in range(cfg.num_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.grad_checkpointing = False
        # Drawn from the global RNG so that every rank (same seed) agrees; see init_experts.
        self.expert_seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item())  # also under meta
        # Experts are initialised by init_experts; skipping them here keeps the global RNG stream, and so every
        # other weight (and the heads built after the encoder), independent of ep_size.
        experts = {id(m) for b in self.blocks if b.soft for m in b.ffn.moe.local_experts.modules()}
        for m in self.modules():
            if id(m) not in experts:
                init_weights(m, cfg.init_std)
        for p in (self.cls_token, self.pos_embed, self.text_pos_embed, self.mask_token):
            if p is not None:
                trunc_normal_(p, std=cfg.init_std)
        if cfg.pos_embed == "sincos":
            with torch.no_grad():
                self.pos_embed[0, 1:] = sincos_pos_embed_2d(d, cfg.grid_size)
                self.pos_embed[0, 0] = 0.0
            self.pos_embed.requires_grad_(False)
        self.init_experts(ep_rank=0)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> EVEModel:
        """The encoder of a native export (`eve-convert export`), ep_size=1, in eval mode. DeepSpeed
        checkpoints and run directories: `eve_ds.convert.load_encoder`."""
        sd, cfg = read_native_export(path)
        enc = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
        model_cfg = EVEConfig.from_dict({k: v for k, v in cfg["model"].items() if k != "flavor"})
        model = cls(dataclasses.replace(model_cfg, ep_size=1), image_mask_token="mask_token" in enc)
        load_state_dict_strict(model, enc, str(path))
        return model.to(device).eval()

    def init_experts(self, ep_rank: int) -> None:
        """(Re)initialise this rank's experts; global expert g gets the same weights for any ep_size."""
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, SoftRouterFFN):
                block.ffn.moe.init_experts(ep_rank, self.expert_seed + i, self.cfg.init_std)

    # -- embeddings ---------------------------------------------------------------------------------------

    def embed_image(
        self, image: Tensor, keep_ids: Tensor | None = None, patch_mask: Tensor | None = None
    ) -> Tensor:
        """image: (B, C, H, W); keep_ids: (B, n) indices of the patches that enter (MIM), None = all;
        patch_mask: (B, P) True where the patch embedding is replaced by `mask_token` (BEiT: before the
        position embedding, so a mask token still knows where it is).
        -> (B, 1 + n, D) = [cls; patches] + position + image type embeddings."""
        x = self.patch_embed(image)
        if patch_mask is not None:
            if self.mask_token is None:
                raise ValueError("patch_mask needs EVEModel(cfg, image_mask_token=True)")
            if keep_ids is not None:
                raise ValueError(
                    "patch_mask (mask tokens inside the encoder) and keep_ids (masked patches "
                    "dropped) are exclusive"
                )
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed[:, 1:]
        if keep_ids is not None:
            x = torch.gather(x, 1, keep_ids[..., None].expand(-1, -1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.type_embed.weight[0]

    def embed_text(self, text_ids: Tensor) -> Tensor:
        """text_ids: (B, L) starting with [CLS] -> (B, L, D) = word [-> LN -> dropout] + position + type."""
        L = text_ids.shape[1]
        if self.cfg.max_text_len < L:
            raise ValueError(f"text length {L} > max_text_len={self.cfg.max_text_len}")
        words = self.word_embed(text_ids)
        if self.text_embed_norm is not None:
            words = self.text_embed_norm(words)
        if self.text_embed_drop is not None:
            words = self.text_embed_drop(words)
        return words + self.text_pos_embed[:, :L] + self.type_embed.weight[1]

    # -- encoder ------------------------------------------------------------------------------------------

    def forward(
        self,
        image: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_mask: Tensor | None = None,
        keep_ids: Tensor | None = None,
        patch_mask: Tensor | None = None,
        has_padding: bool | None = None,
        text_real: int | None = None,
    ) -> EncoderOutput:
        """Encode [image; text]; either part may be absent (image-only / text-only passes).

        image: (B, C, H, W); text_ids, text_mask: (B, L) with text_mask 1 on real tokens;
        keep_ids: (B, n) visible patch indices for the asymmetric MIM pass;
        patch_mask: (B, P) bool, patches replaced by the learned mask token (MIM with token targets);
        has_padding: whether text_mask has a 0 anywhere, when the caller knows it on the host (the data
            path: `batch["text_padded"]`); None reads it from text_mask, a host sync on a GPU;
        text_real: the number of real (text_mask 1) text tokens, when the host knows it (`batch["text_real"]`):
            decides has_padding and gives the soft-router blocks' real-token index a static size.
        """
        parts, n_image = [], 0
        if image is not None:
            parts.append(self.embed_image(image, keep_ids, patch_mask))
            n_image = parts[0].shape[1]
        if text_ids is not None:
            parts.append(self.embed_text(text_ids))
        if not parts:
            raise ValueError("EVEModel needs an image, a text or both")
        x = torch.cat(parts, dim=1)
        if self.embed_norm is not None:  # per token: the same on [image; text] as on each part alone
            x = self.embed_norm(x)
        tokens = self._tokens(
            x, n_image, keep_ids, text_mask if text_ids is not None else None, has_padding, text_real
        )
        aux = x.new_zeros((), dtype=torch.float32)
        counts: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            if self.grad_checkpointing and self.training:
                x, l_aux, c = checkpoint(block, x, tokens, use_reentrant=False)
            else:
                x, l_aux, c = block(x, tokens)
            if l_aux is not None:
                aux = aux + l_aux.float()
                counts[i] = c
        return EncoderOutput(self.norm(x), n_image, aux, counts, pre_norm=x)

    def _tokens(
        self,
        x: Tensor,
        n_image: int,
        keep_ids: Tensor | None,
        text_mask: Tensor | None,
        has_padding: bool | None,
        text_real: int | None,
    ) -> Tokens:
        """What every block needs to know of the sequence x (B, N, D) = [image (n_image); text]; text_mask
        None when there is no text or no mask (see `forward` for the others)."""
        B, N = x.shape[:2]
        valid = torch.ones(B, N, dtype=torch.bool, device=x.device)
        key_padding = None
        if text_mask is not None:
            valid[:, n_image:] = text_mask.bool()
            if has_padding is None and text_real is not None:
                has_padding = text_real < text_mask.numel()
            if has_padding is None:
                has_padding = not bool(valid.all())
            if has_padding:
                key_padding = ~valid
        num_real = None
        if text_mask is None:
            num_real = B * N
        elif text_real is not None:
            num_real = B * n_image + text_real
        tokens = Tokens(n_image, keep_ids, key_padding, valid, num_real=num_real)
        if self.cfg.attention_kernel == "flex" and key_padding is not None:
            tokens.block_mask = padding_block_mask(key_padding)  # once for all blocks, outside any graph
        elif key_padding is not None:  # the padding's float mask, once instead of in every block
            rel = self.cfg.rel_pos_bias and n_image > 0
            fill = padding_fill(self.cfg.attention_kernel, rel, x.dtype)
            tokens.padding_bias = padding_bias(key_padding, fill, x.dtype)
        return tokens
