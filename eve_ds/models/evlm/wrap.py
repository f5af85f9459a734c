"""Gated cross-attention wrapped around the decoder layers of any Hugging Face causal LM, without forking it.

`lm.model.layers[i]` becomes `XAttnDecoderLayer(xattn, layer, level)`, which runs the cross-attention and
then the original layer. The `Media` object reaches every layer as a forward keyword: transformers 5.x
passes the model's `**kwargs` on to each decoder layer, and a keyword (unlike state set on the layers)
is also what a gradient-checkpoint recompute sees. The wrapper pops it before calling the original layer.
State-dict keys become `...layers.{i}.layer.*` and `...layers.{i}.xattn.*`: load the LM before wrapping.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from eve_ds.models.evlm.xattn import GatedXAttn, Media


class XAttnDecoderLayer(nn.Module):
    """xattn (reading feature level `level`) -> the LM's own decoder layer."""

    def __init__(self, xattn: GatedXAttn, layer: nn.Module, level: int) -> None:
        super().__init__()
        self.xattn, self.layer, self.level = xattn, layer, level
        self.grad_checkpointing = False

    def _run(self, hidden_states: Tensor, *args, media: Media | None = None, **kwargs):
        if media is not None:
            lo, hi = media.for_queries(hidden_states.shape[1])
            valid = media.valid if media.valid is not None and media.valid.shape == lo.shape else None
            hidden_states = self.xattn(hidden_states, media.feats[self.level], lo, hi, valid)
        return self.layer(hidden_states, *args, **kwargs)

    def forward(self, hidden_states: Tensor, *args, **kwargs):
        """hidden_states: (B, S, h); `media` (keyword) is None for a text-only pass."""
        if self.grad_checkpointing and self.training:
            # Around the whole wrapper, so the cross-attention activations are recomputed too.
            return checkpoint(self._run, hidden_states, *args, use_reentrant=False, **kwargs)
        return self._run(hidden_states, *args, **kwargs)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layer list of an HF causal LM (`lm.model.layers` for Qwen2, Qwen3, Llama, ...)."""
    layers = getattr(lm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(lm).__name__}: no decoder `layers` ModuleList to wrap")
    return layers


def layer_levels(num_layers: int, num_levels: int, mode: str = "block") -> list[int]:
    """The feature level of each LM layer. block: contiguous groups, shallow levels to low layers
    (40 layers, 8 levels: layers 5l .. 5l + 4 read level l); cycle: layer i reads level i % num_levels."""
    if mode == "cycle":
        return [i % num_levels for i in range(num_layers)]
    if mode == "block":
        return [i * num_levels // num_layers for i in range(num_layers)]
    raise ValueError(f"level_map={mode!r}: expected block | cycle")


def wrap_decoder_layers(
    lm: nn.Module, make_xattn: Callable[[int], GatedXAttn], levels: list[int]
) -> list[XAttnDecoderLayer]:
    """Replace every decoder layer i of `lm` by XAttnDecoderLayer(make_xattn(i), layer, levels[i])."""
    layers = decoder_layers(lm)
    if len(levels) != len(layers):
        raise ValueError(f"{len(levels)} levels for {len(layers)} decoder layers")
    for i, layer in enumerate(layers):
        if isinstance(layer, XAttnDecoderLayer):
            raise ValueError(f"decoder layer {i} is already wrapped")
        layers[i] = XAttnDecoderLayer(make_xattn(i), layer, levels[i])
    return list(layers)
