"""EVLM: a frozen causal LM reading a ViT's hierarchical features through gated cross-attention.

What a trainer calls (nothing here knows about ranks beyond DeepSpeed's MoE layer):
- build: `EVLMModel(cfg)` loads the LM from `cfg.lm_path` (local files only) and the tower from
  `cfg.vision_path`; `EVLMModel(cfg, lm=...)` takes an LM already built (tests, meta-device counts),
  `tower=` an EVE encoder already loaded (from an EVE run or checkpoint: `train/evlm_tower.py`).
- freeze policy: `trainable_parameters(stage)` (stage1 | stage2 | stage3, `STAGES`) sets `requires_grad`
  and returns {"fusion": [...], "vision": [...]}; in stage 1 the "vision" group is the one whose LR stays
  at 0 for the first 25 % of the steps.
- MoE: `init_experts(ep_rank)` draws this rank's routed experts (global expert g alike for any ep_size);
  `upcycle_from(dense_state_dict, ep_rank)` after building an `evlm_*_moe` model; then the usual
  DeepSpeed MoE parameter groups (the experts carry `allreduce=False`).
- checkpoints: `trainable_state_dict()` is what must be saved (the frozen LM and tower come from their
  files); with DeepSpeed: `save_checkpoint(exclude_frozen_parameters=True)`, `load_module_strict=False`.
- `set_grad_checkpointing()`; `forward(batch) -> EVLMOutput` (loss is the objective's, `caption_lm`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from timm.layers import trunc_normal_
from tokenizers import Tokenizer
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from eve_ds.models.evlm.config import VISION_TRAINABLE_FROM, EVLMConfig
from eve_ds.models.evlm.masks import slot_ranges
from eve_ds.models.evlm.moe_xattn import WorldMoE, upcycle
from eve_ds.models.evlm.vision import build_vision, set_trainable_from
from eve_ds.models.evlm.wrap import XAttnDecoderLayer, layer_levels, wrap_decoder_layers
from eve_ds.models.evlm.xattn import GatedXAttn, Media, build_ffn
from eve_ds.utils.io import staging_dir


@dataclass
class EVLMOutput:
    """logits: (B, S, V); aux_loss: summed MoE load-balancing losses (0 when dense);
    expert_counts: {layer: (1, E) routes to each expert in this call}."""

    logits: Tensor
    aux_loss: Tensor
    expert_counts: dict[int, Tensor] = field(default_factory=dict)


def load_lm(cfg: EVLMConfig) -> nn.Module:
    """The causal LM from `cfg.lm_path` (local files), or random from `cfg.lm_layout` when there is none."""
    dtype = getattr(torch, cfg.lm_dtype)
    if cfg.lm_path:
        return AutoModelForCausalLM.from_pretrained(cfg.lm_path, local_files_only=True, dtype=dtype)
    layout = {k: v for k, v in cfg.lm_layout.items() if k != "model_type"}
    return AutoModelForCausalLM.from_config(
        AutoConfig.for_model(cfg.lm_layout["model_type"], **layout), dtype=dtype
    )


def media_token_id(cfg: EVLMConfig) -> int:
    """`cfg.media_token_id`, or the id of `cfg.media_token` in the tokenizer saved with the LM. Read from
    `tokenizer.json` itself: AutoTokenizer picks its class from the LM's model type and may not be the
    tokenizer that was saved (a word-level vocabulary next to a qwen2 config loads as Qwen2Tokenizer)."""
    if cfg.media_token_id >= 0:
        return cfg.media_token_id
    if not cfg.lm_path:
        raise ValueError("model.media_token_id is needed when there is no model.lm_path tokenizer")
    path = os.path.join(cfg.lm_path, "tokenizer.json")
    if os.path.exists(path):
        found = Tokenizer.from_file(path).token_to_id(cfg.media_token)
    else:
        found = (
            AutoTokenizer.from_pretrained(cfg.lm_path, local_files_only=True).get_vocab().get(cfg.media_token)
        )
    if found is None:
        raise ValueError(f"model.media_token={cfg.media_token!r} is not in the tokenizer of {cfg.lm_path}")
    return found


class EVLMModel(nn.Module):
    """Vision tower + media tokens + an HF causal LM whose decoder layers are wrapped (see module doc)."""

    def __init__(self, cfg: EVLMConfig, lm: nn.Module | None = None, tower: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.lm = lm if lm is not None else load_lm(cfg)
        lm_cfg = self.lm.config
        for key in ("hidden_size", "num_hidden_layers"):
            if getattr(lm_cfg, key) != cfg.lm_layout[key]:
                raise ValueError(
                    f"model.lm_layout.{key}={cfg.lm_layout[key]} but the LM has {getattr(lm_cfg, key)}"
                )
        self.lm.config.use_cache = False  # a cache would also turn off the packed-document masks
        self.lm.requires_grad_(False)
        self.media_token_id = media_token_id(cfg)
        self.vision = build_vision(cfg, tower)
        self.media_tokens = nn.Parameter(torch.empty(cfg.num_media_tokens, cfg.lm_hidden))
        trunc_normal_(self.media_tokens, std=cfg.init_std)
        self.time_embed = None
        if cfg.video_time_embed:
            self.time_embed = nn.Parameter(torch.zeros(cfg.video_time_embed, cfg.vision_width))
        levels = layer_levels(lm_cfg.num_hidden_layers, len(cfg.feature_layers), cfg.level_map)
        self.layers = wrap_decoder_layers(self.lm, self._xattn, levels)
        self.init_experts(ep_rank=0)  # a trainer with ep_size > 1 draws its rank's experts again
        self.trainable_parameters(cfg.stage)

    def _xattn(self, i: int) -> GatedXAttn:
        cfg, h = self.cfg, self.cfg.lm_hidden
        if cfg.moe:
            hidden = cfg.xattn_ffn_hidden
            ffn: nn.Module = WorldMoE(
                h, hidden, hidden // cfg.moe_slices, cfg.num_experts, cfg.top_k, cfg.xattn_ffn,
                cfg.ep_size, cfg.drop_tokens, cfg.capacity_factor, cfg.routed_gate_init,
            )  # fmt: skip
        else:
            ffn = build_ffn(h, cfg.xattn_ffn_hidden, cfg.xattn_ffn)
        xattn = GatedXAttn(
            h, cfg.vision_width, cfg.xattn_dim, cfg.xattn_heads, ffn, cfg.gate_init,
            cfg.ffn_on_imageless_text, getattr(self.lm.config, "rms_norm_eps", 1e-6),
        )  # fmt: skip
        # Routed experts are drawn apart (`init_experts`): the draws here must not depend on how many of
        # them this rank holds, so that every other weight is the same for any ep_size.
        experts = set(ffn.local_experts.modules()) if cfg.moe else set()
        for m in xattn.modules():
            if isinstance(m, nn.Linear) and m not in experts:
                trunc_normal_(m.weight, std=cfg.init_std)
        return xattn.to(self.lm.dtype)

    # -- freezing and checkpoints ----------------------------------------------------------------------

    def trainable_parameters(self, stage: str) -> dict[str, list[nn.Parameter]]:
        """Freeze all but the stage's set -> {"fusion": xattn + media tokens, "vision": late ViT blocks}."""
        if stage not in VISION_TRAINABLE_FROM:
            raise ValueError(f"stage={stage!r}: expected one of {list(VISION_TRAINABLE_FROM)}")
        self.requires_grad_(False)
        if stage == "stage0":  # text only: the LM trains, the cross-attention (gates at 0) is skipped
            lm = list(self.lm.parameters())
            for p in lm:
                p.requires_grad_(True)
            return {"fusion": lm, "vision": []}
        fusion = [self.media_tokens, *(p for layer in self.layers for p in layer.xattn.parameters())]
        if self.time_embed is not None:
            fusion.append(self.time_embed)
        for p in fusion:
            p.requires_grad_(True)
        return {"fusion": fusion, "vision": set_trainable_from(self.vision, VISION_TRAINABLE_FROM[stage])}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters a checkpoint must hold (the frozen ones are reloaded from their files)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    @torch.no_grad()
    def upcycle_from(self, dense: dict[str, Tensor], ep_rank: int = 0) -> None:
        """Load a dense EVLM state dict into this MoE model: every weight as is, and each cross-attention
        FFN `...xattn.ffn.*` upcycled into the world expert and this rank's routed experts."""
        if not self.cfg.moe:
            raise ValueError("upcycle_from needs a MoE config (model.moe=true)")
        moe_keys = {n for n, _ in self.named_parameters() if ".xattn.ffn." in n}
        missing, _ = self.load_state_dict(
            {k: v for k, v in dense.items() if ".xattn.ffn." not in k}, strict=False
        )
        left = [k for k in missing if k not in moe_keys and not k.endswith("ffn.beta")]
        if left:
            raise ValueError(f"dense state dict lacks {left[:5]} ({len(left)} keys)")
        for name, module in self.named_modules():
            if isinstance(module, XAttnDecoderLayer):
                prefix = f"{name}.xattn.ffn."
                ffn = build_ffn(self.cfg.lm_hidden, self.cfg.xattn_ffn_hidden, self.cfg.xattn_ffn)
                ffn.load_state_dict({k[len(prefix) :]: v for k, v in dense.items() if k.startswith(prefix)})
                upcycle(ffn, module.xattn.ffn, self.cfg.moe_copies, self.cfg.moe_slices, ep_rank)

    @property
    def collective(self) -> bool:
        """Every forward is a collective call (MoE with ep_size > 1): each rank must make the same calls."""
        return self.cfg.moe and self.cfg.ep_size > 1

    @torch.no_grad()
    def init_experts(self, ep_rank: int) -> None:
        """(Re)draw this rank's routed experts so that global expert g of layer i has the same weights for
        any ep_size: truncated normal from a generator seeded by (i, g), as EVE's experts."""
        if not self.cfg.moe:
            return
        std = self.cfg.init_std
        for i, layer in enumerate(self.layers):
            experts = layer.xattn.ffn.local_experts
            for j, expert in enumerate(experts):
                gen = torch.Generator().manual_seed(i * 1009 + ep_rank * len(experts) + j)
                for p in expert.parameters():
                    if p.is_meta:  # a meta-device build (parameter counts): nothing to fill
                        continue
                    w = torch.empty(p.shape, device="cpu").normal_(0.0, std, generator=gen)
                    p.copy_(w.clamp_(-2 * std, 2 * std))

    def active_params_per_token(self) -> int:
        """Every parameter (experts of all ranks), less the routed experts a token skips ((E - k) per layer)."""
        total = sum(p.numel() * (self.cfg.ep_size if getattr(p, "allreduce", True) is False else 1)
                    for p in self.parameters())  # fmt: skip
        if not self.cfg.moe:
            return total
        expert = sum(p.numel() for p in self.layers[0].xattn.ffn.local_experts[0].parameters())
        return total - len(self.layers) * (self.cfg.num_experts - self.cfg.top_k) * expert

    # -- forward -----------------------------------------------------------------------------------------

    def embed(self, input_ids: Tensor, images_per_row: Tensor) -> Tensor:
        """input_ids: (B, S) with K placeholder ids per image; images_per_row: (B,) -> (B, S, h), the
        learned tokens 0..K-1 written over each run of K placeholders."""
        is_media = input_ids == self.media_token_id
        K = self.cfg.num_media_tokens
        n = is_media.sum(1)
        bad = (n != images_per_row * K).nonzero().flatten().tolist()
        if bad:
            r = bad[0]
            raise ValueError(
                f"row {r}: {int(images_per_row[r])} images but {int(n[r])} media positions "
                f"({K} per image expected)"
            )
        x = self.lm.get_input_embeddings()(input_ids)
        idx = (is_media.cumsum(1) - 1).clamp(min=0) % K  # (B, S) index of each placeholder in its run
        return torch.where(is_media[..., None], self.media_tokens[idx].to(x.dtype), x)

    def with_time(self, feats: list[Tensor], clip_of_slot: Tensor | None) -> list[Tensor]:
        """feats [(B, M, 1 + P, Dv)] per level, clip_of_slot (B, M) -> the features with `time_embed`'s row f
        added to the slots that are frame f of a clip (as they are with `video_time_embed` off, or without
        clips)."""
        if self.time_embed is None or clip_of_slot is None:
            return feats
        first, _ = slot_ranges(clip_of_slot)
        frame = torch.arange(clip_of_slot.shape[1], device=first.device) - first  # (B, M); stills: 0
        F = self.time_embed.shape[0]
        if int(frame.max()) >= F:  # one host read per forward, with the option on
            raise ValueError(f"a clip of {int(frame.max()) + 1} frames; model.video_time_embed={F} rows")
        add = self.time_embed[frame] * (clip_of_slot >= 0)[..., None]  # (B, M, Dv)
        return [f + add[:, :, None].to(f.dtype) for f in feats]

    def media(
        self, images: Tensor | None, image_slot: Tensor, B: int, M: int, lo: Tensor, hi: Tensor,
        clip_of_slot: Tensor | None = None,
    ) -> Media:  # fmt: skip
        """images: (N, 3, H, W); image_slot: (N, 2) = (row, slot) -> Media with feats [(B, M, 1 + P, Dv)]
        per level (unused slots zero: no interval covers them)."""
        if images is None or images.shape[0] == 0:
            # No image: the tower still runs, on one blank image whose features enter times 0, so that every
            # rank calls the same modules and gives every trainable parameter a gradient (data-parallel
            # gradient reductions, collective layers), as the cross-attention always runs.
            S = self.cfg.image_size
            tower = next(self.vision.parameters())
            blank = tower.new_zeros(1, 3, S, S)
            feats = [(0.0 * level[:, :1, None]).expand(B, 1, 1, -1) for level in self.vision(blank)]
            return Media(feats, lo, hi)
        rows, slots = image_slot.unbind(1)
        if int(rows.max()) >= B or int(slots.max()) >= M:
            raise ValueError(f"image_slot {image_slot.tolist()} outside the batch's {B} rows x {M} slots")
        feats = []
        for level in self.vision(images):  # (N, 1 + P, Dv)
            full = level.new_zeros(B, M, *level.shape[1:])
            full[rows, slots] = level
            feats.append(full)
        return Media(self.with_time(feats, clip_of_slot), lo, hi)

    def _images_per_row(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, int]:
        """-> image_slot (N, 2), images per row (B,), slots per row M."""
        ids = batch["input_ids"]
        slot = batch.get("image_slot")
        if slot is None:
            slot = ids.new_zeros(0, 2)
        per_row = (
            torch.bincount(slot[:, 0], minlength=ids.shape[0])
            if slot.numel()
            else ids.new_zeros(ids.shape[0])
        )
        M = int(batch.get("num_slots", int(slot[:, 1].max()) + 1 if slot.numel() else 1))
        return slot, per_row, M

    def forward(self, batch: dict[str, Tensor]) -> EVLMOutput:
        """batch: input_ids, position_ids (restarting per document), lo, hi, valid: (B, S); images
        (N, 3, H, W) with image_slot (N, 2) and num_slots M (optional: a text-only batch). In stage0 the
        cross-attention is not run at all: the LM alone, on text."""
        ids = batch["input_ids"]
        slot, per_row, M = self._images_per_row(batch)
        media = None
        if self.cfg.stage != "stage0":
            media = self.media(
                batch.get("images"),
                slot,
                ids.shape[0],
                M,
                batch["lo"],
                batch["hi"],
                batch.get("clip_of_slot"),
            )
            media.valid = batch.get("valid")
        out = self.lm(
            inputs_embeds=self.embed(ids, per_row),
            position_ids=batch.get("position_ids"),
            media=media,
            use_cache=False,
        )
        aux = out.logits.new_zeros((), dtype=torch.float32)
        counts = {}
        for i, layer in enumerate(self.layers):
            if layer.xattn.last_aux is not None:
                aux = aux + layer.xattn.last_aux.float()
                counts[i] = layer.xattn.last_routes.reshape(1, -1)  # (1, E): one row, all tokens
                layer.xattn.last_aux = layer.xattn.last_routes = None
        return EVLMOutput(out.logits, aux, counts)

    # -- generation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_greedy(
        self, batch: dict[str, Tensor], max_new_tokens: int, eos_id: int, use_cache: bool = True,
        media: Media | None = None,
    ) -> Tensor:  # fmt: skip
        """Greedy continuation of every row of `batch` (a prompt per row, as `forward` takes it, ending
        where the answer starts, no trailing padding) -> (B, T <= max_new_tokens) token ids, `eos_id`
        after a row's end. Prompts of several lengths: padded at the start (`stack_rows(..., left=True)`,
        whose `attention_mask` keeps every row from reading the padding); each row's tokens are then those
        it gets alone. New tokens continue the prompt's last text, so they read the image slots of the
        prompt's last position. `use_cache=False` recomputes the whole sequence at each step (the
        reference the cached loop must equal). `media`: precomputed features (skips the tower). The
        placeholder id is never generated. Under expert parallelism (`collective`) every step runs, done or
        not: each step's MoE calls are collective, and the other ranks' rows may not be done."""
        ids = batch["input_ids"]
        B, S = ids.shape
        slot, per_row, M = self._images_per_row(batch)
        if media is None:
            media = self.media(
                batch.get("images"), slot, B, M, batch["lo"], batch["hi"], batch.get("clip_of_slot")
            )
        pos = batch.get("position_ids")
        pos = torch.arange(S, device=ids.device).expand(B, S) if pos is None else pos
        embeds = self.embed(ids, per_row)
        table = self.lm.get_input_embeddings()
        cache = DynamicCache(config=self.lm.config) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        out: list[Tensor] = []
        mask = batch.get("attention_mask")  # (B, S) 0 on left padding; grows by a 1 per new token
        step_embeds, step_pos, step_media = embeds, pos, media
        for _ in range(max_new_tokens):
            logits = self.lm(
                inputs_embeds=step_embeds, position_ids=step_pos, media=step_media, cache=cache,
                use_cache=use_cache, attention_mask=mask,
            ).logits[:, -1].float()  # fmt: skip
            logits[:, self.media_token_id] = float("-inf")
            nxt = torch.where(done, eos_id, logits.argmax(-1))
            out.append(nxt)
            done = done | (nxt == eos_id)
            if bool(done.all()) and not self.collective:
                break
            new_embed, new_pos = table(nxt)[:, None], step_pos[:, -1:] + 1
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            if use_cache:  # only the new token: its keys join the cache, its media interval the last one's
                step_embeds, step_pos = new_embed, new_pos
                step_media = Media(media.feats, media.lo[:, -1:], media.hi[:, -1:])
            else:
                step_embeds = torch.cat([step_embeds, new_embed], 1)
                step_pos = torch.cat([step_pos, new_pos], 1)
                lo, hi = step_media.lo, step_media.hi
                step_media = Media(
                    media.feats, torch.cat([lo, lo[:, -1:]], 1), torch.cat([hi, hi[:, -1:]], 1)
                )
        return torch.stack(out, 1)

    def export_lm(self, path: str, tokenizer=None) -> None:
        """Save the LM as it was before wrapping (`save_pretrained`, + `tokenizer` when given) into `path`,
        atomically: what `model.lm_path` of a later stage loads with `from_pretrained`."""
        lm = AutoModelForCausalLM.from_config(self.lm.config, dtype=self.lm.dtype)
        state = {
            k.replace(".layer.", ".", 1): v for k, v in self.lm.state_dict().items() if ".xattn." not in k
        }
        lm.load_state_dict(state, strict=True)
        lm.config.use_cache = True  # the saved model is a plain causal LM again
        with staging_dir(path, overwrite=True) as tmp:
            lm.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
