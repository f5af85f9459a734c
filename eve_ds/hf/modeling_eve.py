"""EVE encoder for inference with Hugging Face transformers (``trust_remote_code=True``).

Self-contained: torch + transformers only. Same computation as ``eve_ds.models.EVEModel`` in eval mode:

    tokens = [image cls; patches] + pos + type[0]  ;  text = [LN](word) + text_pos + type[1]
    x = [LN](tokens)   (the bracketed norms only with text_embed_norm / embed_norm)
    block:  x += γ1 · Attn(LN(x)) (relative position bias among image tokens, -inf on text padding)
            x += γ2 · FFN(x): hard router = per-modality LN + MLP; soft router = LN + MoE whose router (and,
            with modality_bias_to_experts, whose experts) sees x + b_modality; top-2 experts by
            softmax(W (x + b_m)), their weights renormalised to sum to 1 (DeepSpeed's top2gating without
            second-expert sampling; top-1: the raw softmax weight)
    out = LN(x)        MLP activation: exact GELU, or quick GELU x·σ(1.702x) with ffn_act=quick_gelu

Outputs: ``last_hidden_state`` (B, N, D) in the order [image cls; patches; text] and ``n_image``.

``EVEForVQA`` (exports of VQA fine-tunes): the encoder under ``eve`` and the fine-tuned head on the text
[CLS] output (hidden[:, n_image]): Linear(D, 2D), LayerNorm, GELU, Linear(2D, A) -> ``logits`` (B, A) over
the answers of ``config.id2label``; the head was trained with binary cross-entropy, so sigmoid(logits) is
each answer's score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput


class EVEHFConfig(PretrainedConfig):
    model_type = "eve"

    def __init__(
        self,
        image_size=224,
        patch_size=16,
        in_chans=3,
        vocab_size=30522,
        max_text_len=40,
        pad_token_id=0,
        num_layers=12,
        hidden_size=768,
        num_heads=12,
        ffn_size=3072,
        qkv_bias=True,
        layer_scale=True,
        rel_pos_bias=True,
        norm_eps=1e-6,
        soft_blocks=(10, 11),
        num_experts=32,
        moe_top_k=2,
        modality_routing=True,
        text_embed_norm=False,
        embed_norm=False,
        ffn_act="gelu",
        modality_bias_to_experts=False,
        head_norm_eps=None,
        text_rule=None,
        **kwargs,
    ):
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.vocab_size, self.max_text_len = vocab_size, max_text_len
        self.num_layers, self.hidden_size, self.num_heads, self.ffn_size = (
            num_layers,
            hidden_size,
            num_heads,
            ffn_size,
        )
        self.qkv_bias, self.layer_scale, self.rel_pos_bias, self.norm_eps = (
            qkv_bias,
            layer_scale,
            rel_pos_bias,
            norm_eps,
        )
        self.soft_blocks = list(soft_blocks)
        self.num_experts, self.moe_top_k, self.modality_routing = num_experts, moe_top_k, modality_routing
        self.text_embed_norm, self.embed_norm, self.ffn_act = text_embed_norm, embed_norm, ffn_act
        self.modality_bias_to_experts = modality_bias_to_experts
        self.head_norm_eps = head_norm_eps  # LayerNorm ε of task heads; None = norm_eps
        # How the fine-tuning cleaned texts before the tokenizer ({"kind": "question" | "caption",
        # "max_words": N}; None: as they are); apply it with `clean_text` before tokenising.
        self.text_rule = text_rule
        super().__init__(pad_token_id=pad_token_id, **kwargs)


_DROP = ",.'!?\"()*#:;~"
_QUESTION_TABLE = str.maketrans({**dict.fromkeys(_DROP), "-": " ", "/": " "})
_CAPTION_TABLE = str.maketrans({**dict.fromkeys(_DROP + "`"), "-": " ", "/": " "})


def clean_text(text: str, rule: dict | None) -> str:
    """`text` cleaned by `config.text_rule` as the model's fine-tuning cleaned it (the official EVE rules:
    lower case, punctuation removed, "-" and "/" as spaces, the first max_words words); None: unchanged.
    Kept standalone here (the export imports no eve_ds); eve_ds.data.text is the reference it is tested on."""
    if not rule:
        return text
    if rule["kind"] == "question":
        out = text.lower().translate(_QUESTION_TABLE).rstrip(" ")
    else:
        out = " ".join(text.lower().translate(_CAPTION_TABLE).replace("<person>", "person").split())
    words, n = out.split(" "), rule.get("max_words")
    return out if n is None or len(words) <= n else " ".join(words[:n])


@dataclass
class EVEHFOutput(ModelOutput):
    last_hidden_state: Tensor | None = None
    n_image: int | None = None


def relative_position_index(grid: int) -> Tensor:
    """BEiT's index (1 + G², 1 + G²) into a ((2G-1)² + 3)-row table; the last 3 rows: cls->patch,
    patch->cls, cls->cls."""
    n_rel = (2 * grid - 1) ** 2 + 3
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)
    n = grid * grid + 1
    index = torch.zeros(n, n, dtype=torch.long)
    index[1:, 1:] = rel[..., 0] * (2 * grid - 1) + rel[..., 1]
    index[0, 1:], index[1:, 0], index[0, 0] = n_rel - 3, n_rel - 2, n_rel - 1
    return index


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class Mlp(nn.Module):
    def __init__(self, d: int, f: int, act: str = "gelu") -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.act = ACTS[act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, c: EVEHFConfig) -> None:
        super().__init__()
        d, g = c.hidden_size, c.image_size // c.patch_size
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d)) if c.qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(d)) if c.qkv_bias else None
        self.proj = nn.Linear(d, d)
        if c.rel_pos_bias:
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * g - 1) ** 2 + 3, c.num_heads))

    def forward(self, x: Tensor, n_image: int, pad_bias: Tensor | None, index: Tensor) -> Tensor:
        B, N, D = x.shape
        bias = (
            None
            if self.q_bias is None
            else torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        )
        q, k, v = F.linear(x, self.qkv.weight, bias).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None
        if hasattr(self, "relative_position_bias_table") and n_image > 0:
            rel = self.relative_position_bias_table[index].permute(2, 0, 1)[None]  # (1, H, n, n)
            mask = F.pad(rel, (0, N - n_image, 0, N - n_image)).to(q.dtype)
        if pad_bias is not None:
            mask = pad_bias if mask is None else mask + pad_bias
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class HardRouterFFN(nn.Module):
    def __init__(self, c: EVEHFConfig) -> None:
        super().__init__()
        d, f = c.hidden_size, c.ffn_size
        self.norm_image, self.norm_text = nn.LayerNorm(d, eps=c.norm_eps), nn.LayerNorm(d, eps=c.norm_eps)
        self.ffn_image, self.ffn_text = Mlp(d, f, c.ffn_act), Mlp(d, f, c.ffn_act)

    def forward(self, x: Tensor, n_image: int, valid: Tensor) -> Tensor:
        parts = []
        if n_image > 0:
            parts.append(self.ffn_image(self.norm_image(x[:, :n_image])))
        if n_image < x.shape[1]:
            parts.append(self.ffn_text(self.norm_text(x[:, n_image:])))
        return torch.cat(parts, dim=1)


class SoftRouterFFN(nn.Module):
    """LN + modality-aware MoE; text padding gets a zero output (it never reaches the router)."""

    def __init__(self, c: EVEHFConfig) -> None:
        super().__init__()
        d = c.hidden_size
        self.top_k = c.moe_top_k
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.gate = nn.Linear(d, c.num_experts, bias=False)
        self.modality_bias = nn.Parameter(torch.zeros(2, d)) if c.modality_routing else None
        self.bias_to_experts = c.modality_bias_to_experts
        self.experts = nn.ModuleList(Mlp(d, c.ffn_size, c.ffn_act) for _ in range(c.num_experts))

    def forward(self, x: Tensor, n_image: int, valid: Tensor) -> Tensor:
        h = self.norm(x)
        r = h
        if self.modality_bias is not None:
            modality = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
            modality[:, :n_image] = 0
            r = h + self.modality_bias[modality].to(h.dtype)
        probs = F.softmax(F.linear(r.float(), self.gate.weight.float()), dim=-1)  # (B, N, E)
        top, idx = probs.topk(self.top_k, dim=-1)
        if self.top_k == 2:
            top = top / top.sum(-1, keepdim=True).clamp(min=torch.finfo(top.dtype).eps)
        weights = torch.zeros_like(probs).scatter(-1, idx, top)  # (B, N, E), k non-zeros per token
        if self.bias_to_experts:
            h = r
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            sel = (weights[..., e] > 0) & valid
            if sel.any():
                out[sel] += weights[..., e][sel, None].to(h.dtype) * expert(h[sel])
        return out


class Block(nn.Module):
    def __init__(self, c: EVEHFConfig, soft: bool) -> None:
        super().__init__()
        d = c.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=c.norm_eps)
        self.attn = Attention(c)
        self.ffn = SoftRouterFFN(c) if soft else HardRouterFFN(c)
        self.gamma_1 = nn.Parameter(torch.ones(d)) if c.layer_scale else None
        self.gamma_2 = nn.Parameter(torch.ones(d)) if c.layer_scale else None

    def forward(self, x, n_image, pad_bias, valid, index):
        a = self.attn(self.norm1(x), n_image, pad_bias, index)
        x = x + (a if self.gamma_1 is None else self.gamma_1 * a)
        f = self.ffn(x, n_image, valid)
        return x + (f if self.gamma_2 is None else self.gamma_2 * f)


class EVEHFModel(PreTrainedModel):
    config_class = EVEHFConfig
    base_model_prefix = "eve"
    main_input_name = "pixel_values"

    def __init__(self, config: EVEHFConfig) -> None:
        super().__init__(config)
        c, d = config, config.hidden_size
        grid = c.image_size // c.patch_size
        self.patch_embed = nn.Conv2d(c.in_chans, d, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.word_embed = nn.Embedding(c.vocab_size, d)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, c.max_text_len, d))
        self.type_embed = nn.Embedding(2, d)
        self.text_embed_norm = nn.LayerNorm(d, eps=c.norm_eps) if c.text_embed_norm else None
        self.embed_norm = nn.LayerNorm(d, eps=c.norm_eps) if c.embed_norm else None
        self.blocks = nn.ModuleList(Block(c, i in set(c.soft_blocks)) for i in range(c.num_layers))
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.register_buffer("relative_position_index", relative_position_index(grid), persistent=True)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights always come from model.safetensors

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> EVEHFOutput:
        """pixel_values: (B, C, H, W) normalised images; input_ids, attention_mask: (B, L) starting with
        [CLS]; either part may be absent. -> last_hidden_state (B, N, D)."""
        parts, n_image = [], 0
        if pixel_values is not None:
            x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
            parts.append(torch.cat([cls, x], dim=1) + self.type_embed.weight[0])
            n_image = parts[0].shape[1]
        if input_ids is not None:
            L = input_ids.shape[1]
            words = self.word_embed(input_ids)
            if self.text_embed_norm is not None:
                words = self.text_embed_norm(words)
            parts.append(words + self.text_pos_embed[:, :L] + self.type_embed.weight[1])
        if not parts:
            raise ValueError("EVE needs pixel_values, input_ids or both")
        x = torch.cat(parts, dim=1)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        valid = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        pad_bias = None
        if input_ids is not None and attention_mask is not None:
            valid[:, n_image:] = attention_mask.bool()
            if not bool(valid.all()):
                pad_bias = torch.zeros(valid.shape, dtype=x.dtype, device=x.device)
                pad_bias = pad_bias.masked_fill(~valid, torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.blocks:
            x = block(x, n_image, pad_bias, valid, self.relative_position_index)
        return EVEHFOutput(last_hidden_state=self.norm(x), n_image=n_image)


@dataclass
class EVEVQAOutput(ModelOutput):
    logits: Tensor | None = None
    last_hidden_state: Tensor | None = None


class EVEForVQA(PreTrainedModel):
    config_class = EVEHFConfig
    base_model_prefix = "eve"
    main_input_name = "pixel_values"

    def __init__(self, config: EVEHFConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        eps = config.head_norm_eps or config.norm_eps
        self.eve = EVEHFModel(config)
        self.vqa_head = nn.Sequential(
            nn.Linear(d, 2 * d), nn.LayerNorm(2 * d, eps=eps), nn.GELU(), nn.Linear(2 * d, config.num_labels)
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # weights always come from model.safetensors

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs,
    ) -> EVEVQAOutput:
        """pixel_values: (B, C, H, W); input_ids, attention_mask: (B, L) -> logits (B, A) float32."""
        if input_ids is None:
            raise ValueError("EVEForVQA needs the question's input_ids")
        out = self.eve(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        logits = self.vqa_head(out.last_hidden_state[:, out.n_image]).float()
        return EVEVQAOutput(logits=logits, last_hidden_state=out.last_hidden_state)
