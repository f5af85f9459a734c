"""EVLM's efficiency claim as a benchmark: the LM side of gated cross-attention vs the same frozen LM
reading the image tokens by concatenation (LLaVA-style), at the paper's two settings (pre-training: 256
image tokens, 64 text tokens; continual pre-training: 1,024 image tokens).

For each setting: the analytic FLOPs ratio (`models.evlm.counts.lm_side_flops`, eq. 1 / eq. 2) at the
paper's widths and at the benchmark model's, next to the measured ratio of training-step times and of
forward times of the two readers (`models.evlm.concat`) on the same hardware, the same batch and the same
frozen LM, through the real DeepSpeed engine. The ViT is the same in both and is left out, as the
paper's ratio leaves it out: the readers take random image features of the ViT's width.

The benchmark LM has the paper's proportions at a CPU size: MHA (no GQA) and a SwiGLU MLP of 8h/3 (so
that a layer is the formula's 24 s h^2), r_xc = 0.2, r_xf = 0.5, d_img / h = 0.35 as 1792 / 5120.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from eve_ds.models.evlm.concat import ConcatReader, XAttnReader
from eve_ds.models.evlm.config import EVLMConfig, evlm_14b, evlm_tiny
from eve_ds.models.evlm.counts import lm_side_flops

# The paper's two settings: (name, image tokens, text tokens) [paper] Sec. 2.
SETTINGS = [("pre-training", 256, 64), ("continual pre-training", 1024, 64)]
PAPER_RATIOS = {"pre-training": 0.24, "continual pre-training": 0.077}  # [paper]


@dataclass
class EfficiencyConfig:
    hidden: int = 160
    layers: int = 4
    heads: int = 4
    batch: int = 4
    warmup_steps: int = 3
    steps: int = 10  # timed, per reader and setting (the median is reported)
    seed: int = 0
    settings: list = field(default_factory=lambda: [list(s) for s in SETTINGS])

    def model_config(self) -> EVLMConfig:
        h = self.hidden
        layout = dict(model_type="qwen2", hidden_size=h, num_hidden_layers=self.layers,
                      num_attention_heads=self.heads, num_key_value_heads=self.heads,
                      intermediate_size=8 * round(h / 3), vocab_size=64, tie_word_embeddings=True,
                      use_cache=False)  # fmt: skip
        d_img = round(0.35 * h / 8) * 8
        return evlm_tiny(lm_layout=layout, r_xc=0.2, r_xf=0.5, xattn_heads=4, vision_width=d_img,
                         vision_mlp=2 * d_img, vision_depth=2, feature_layers=[0, 1], media_token_id=1,
                         vision_kwargs=dict(num_heads=d_img // 8), num_media_tokens=16)  # fmt: skip


def analytic(cfg: EVLMConfig, s_img: int, s_txt: int) -> dict[str, float]:
    """FLOPs ratios (xattn / concat) of a config: with s_q = s_txt (the paper's convention) and with the
    media tokens counted apart (s_q = K + s_txt, what the benchmark model runs)."""
    args = (s_img, s_txt, cfg.lm_hidden, cfg.vision_width, cfg.r_xc, cfg.r_xf)
    return {
        "ratio": lm_side_flops(*args, ffn=cfg.xattn_ffn)["ratio"],
        "ratio_media_apart": lm_side_flops(*args, s_q=cfg.num_media_tokens + s_txt, ffn=cfg.xattn_ffn)[
            "ratio"
        ],
    }


def build_reader(kind: str, cfg: EVLMConfig, seed: int) -> torch.nn.Module:
    from eve_ds.models.evlm.model import EVLMModel, load_lm

    torch.manual_seed(seed)  # the same frozen LM in both readers
    if kind == "concat":
        return ConcatReader(load_lm(cfg), cfg.vision_width)
    evlm = EVLMModel(cfg, lm=load_lm(cfg))
    evlm.vision.requires_grad_(False)  # not run: the features come in directly
    return XAttnReader(evlm)


def make_engine(model: torch.nn.Module, batch: int):
    from eve_ds.train.config import load_config
    from eve_ds.train.engine import build_engine

    run = load_config("evlm_tiny_synthetic", [f"train.micro_batch_size={batch}",
                                              f"train.global_batch_size={batch}", "train.max_steps=1000000"])  # fmt: skip
    return build_engine(run, model, world_size=1, device="cpu")[0]


def timed(fn, warmup: int, steps: int) -> float:
    """Median seconds of `fn()` over `steps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(kind: str, cfg: EVLMConfig, ec: EfficiencyConfig, s_img: int, s_txt: int) -> dict[str, float]:
    """{"step_s": fwd + bwd + AdamW through the engine, "forward_s": no-grad forward} of one reader."""
    g = torch.Generator().manual_seed(ec.seed)
    batch = {
        "feats": torch.randn(ec.batch, s_img, cfg.vision_width, generator=g),
        "text_ids": torch.randint(2, 64, (ec.batch, s_txt), generator=g),
    }
    engine = make_engine(build_reader(kind, cfg, ec.seed), ec.batch)

    def step():
        engine.backward(engine(batch)["loss"])
        engine.step()

    def forward():
        with torch.no_grad():
            engine.module(batch)

    return {"step_s": timed(step, ec.warmup_steps, ec.steps), "forward_s": timed(forward, 1, ec.steps)}


def run_efficiency(ec: EfficiencyConfig, progress=None) -> dict:
    """-> {"config", "rows": [per setting: analytic ratios (paper widths, benchmark widths), measured
    times of both readers and their ratios]}."""
    cfg, paper_cfg = ec.model_config(), evlm_14b()
    rows = []
    for name, s_img, s_txt in ec.settings:
        times = {kind: measure(kind, cfg, ec, s_img, s_txt) for kind in ("xattn", "concat")}
        row = {
            "setting": name,
            "image_tokens": s_img,
            "text_tokens": s_txt,
            "paper_ratio": PAPER_RATIOS.get(name),
            "flops_ratio_paper_widths": analytic(paper_cfg, s_img, s_txt),
            "flops_ratio_bench_widths": analytic(cfg, s_img, s_txt),
            "times": times,
            "step_time_ratio": times["xattn"]["step_s"] / times["concat"]["step_s"],
            "forward_time_ratio": times["xattn"]["forward_s"] / times["concat"]["forward_s"],
        }
        rows.append(row)
        if progress:
            progress(row)
    bench = {k: getattr(cfg, k) for k in ("r_xc", "r_xf", "vision_width", "num_media_tokens", "xattn_ffn")}
    return {"config": {**asdict(ec), "lm_layout": cfg.lm_layout, **bench}, "rows": rows}


def to_markdown(record: dict, command: str) -> str:
    c = record["config"]
    lines = [
        "# EVLM efficiency: gated cross-attention vs concatenation (LM side, CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Benchmark LM: Qwen2 {c['layers']} x {c['hidden']} (MHA, SwiGLU {c['lm_layout']['intermediate_size']}), "
        f"r_xc {c['r_xc']}, r_xf {c['r_xf']}, d_img {c['vision_width']}, {c['num_media_tokens']} media tokens, "
        f"batch {c['batch']}; median of {c['steps']} steps after {c['warmup_steps']} warm-up, DeepSpeed "
        "engine on CPU (fp32, ZeRO-2). FLOPs ratios: s_q = s_txt (the paper's convention) / "
        "s_q = media + text tokens (what runs).",
        "",
        "| setting | image / text tokens | paper | FLOPs ratio, paper widths | FLOPs ratio, bench widths "
        "| step time ratio | forward time ratio | step xattn / concat (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        p, b, t = r["flops_ratio_paper_widths"], r["flops_ratio_bench_widths"], r["times"]
        lines.append(
            f"| {r['setting']} | {r['image_tokens']} / {r['text_tokens']} | {r['paper_ratio']} "
            f"| {p['ratio']:.4f} / {p['ratio_media_apart']:.4f} | {b['ratio']:.4f} / {b['ratio_media_apart']:.4f} "
            f"| {r['step_time_ratio']:.3f} | {r['forward_time_ratio']:.3f} "
            f"| {1e3 * t['xattn']['step_s']:.1f} / {1e3 * t['concat']['step_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"
