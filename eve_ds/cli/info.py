"""``eve-info NAME [KEY=VALUE ...] [--json]``: the resolved architecture of a model flavor and its parameter
counts, from a model built on the meta device (no memory, no initialisation cost).

The counts are defined in `eve_ds/objectives/info.py`.
"""

from __future__ import annotations

import argparse
import json
import sys

from eve_ds.models.evlm.config import FLAVORS as EVLM_FLAVORS
from eve_ds.models.evlm.config import get_config as evlm_config
from eve_ds.models.evlm.counts import param_counts as evlm_param_counts
from eve_ds.objectives.info import describe
from eve_ds.utils.config import parse_override


def parse_overrides(items: list[str]) -> dict:
    """``["model.ep_size=4", "top_k=1"]`` -> ``{"ep_size": 4, "top_k": 1}`` (values parsed as YAML)."""
    out = {}
    for item in items:
        parts, value = parse_override(item)
        out[".".join(parts).removeprefix("model.")] = value
    return out


def _millions(n: int) -> str:
    return f"{n / 1e6:,.2f} M"


def format_table(info: dict) -> str:
    """A two-column table: architecture first, then parameter counts."""
    blocks = ", ".join(map(str, info["soft_router_blocks"])) or "-"
    rows = [
        ("flavor", info["name"]),
        ("blocks (layers)", info["num_layers"]),
        ("hidden / ffn / heads", f"{info['hidden_size']} / {info['ffn_size']} / {info['num_heads']}"),
        ("image / patch -> patches", f"{info['image_size']} / {info['patch_size']} -> {info['num_patches']}"),
        ("text positions / vocab", f"{info['max_text_len']} / {info['vocab_size']}"),
        ("hard-router blocks", _ranges(info["hard_router_blocks"])),
        ("soft-router blocks", blocks),
        ("experts / top-k", f"{info['num_experts']} / top-{info['top_k']}"),
        ("ep_size (experts per rank)", f"{info['ep_size']} ({info['experts_per_rank']})"),
        ("drop_tokens / modality routing", f"{info['drop_tokens']} / {info['modality_routing']}"),
        ("b_m to experts / FFN activation", f"{info['modality_bias_to_experts']} / {info['ffn_act']}"),
        ("text-embedding / input norm", f"{info['text_embed_norm']} / {info['embed_norm']}"),
        (
            "pixel decoder depth/width/heads",
            f"{info['decoder_depth']} / {info['decoder_width']} / {info['decoder_heads']}",
        ),
        ("params total", _millions(info["params_total"])),
        ("  encoder", _millions(info["params_encoder"])),
        ("    embeddings (+ rel-pos tables)", _millions(info["params_embeddings"])),
        ("    experts (all ranks)", _millions(info["params_experts"])),
        ("    experts per ep rank", _millions(info["params_experts_per_rank"])),
        ("  heads", _millions(info["params_heads"])),
        *((f"    {k}", _millions(v)) for k, v in info["params_heads_by_objective"].items()),
        ("active per token (encoder)", _millions(info["params_active_per_token"])),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for i, b in enumerate(ids):
        if start is None:
            start = b
        if i + 1 == len(ids) or ids[i + 1] != b + 1:
            out.append(str(start) if start == b else f"{start}-{b}")
            start = None
    return ", ".join(out) or "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="eve-info",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name",
        help="model flavor: eve_tiny, eve_base, eve_large, or an EVLM flavor (evlm_tiny, evlm_14b, ...)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="model config overrides, e.g. ep_size=4 or model.num_experts=16",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_intermixed_args(argv)
    if args.name in EVLM_FLAVORS:
        return evlm_info(args, parser)
    try:
        info = describe(args.name, parse_overrides(args.overrides))
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0


def evlm_info(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """EVLM: total parameters, trainable per stage, active per token (counted from the layouts, not built)."""
    try:
        counts = evlm_param_counts(evlm_config(args.name, **parse_overrides(args.overrides)))
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps({"name": args.name, **counts}, indent=2))
        return 0
    rows = [("total", counts["total_params"]), ("active per token", counts["active_params_per_token"])]
    rows += [(f"trainable, {stage}", n) for stage, n in counts["trainable_params"].items()]
    rows += [(f"  {part}", n) for part, n in counts["parts"].items()]
    print(f"{args.name}\n" + "\n".join(f"{k:<24}  {_millions(n)}" for k, n in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
