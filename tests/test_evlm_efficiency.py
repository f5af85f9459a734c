"""EVLM's efficiency claim: the analytic LM-side FLOPs of cross-attention vs concatenation against the
paper's ratios, and the benchmark's two readers (same frozen LM) on the real DeepSpeed engine."""

from __future__ import annotations

import pytest
import torch

from eve_ds.bench.evlm_efficiency import EfficiencyConfig, analytic, build_reader, run_efficiency, to_markdown
from eve_ds.models.evlm.config import evlm_14b
from eve_ds.models.evlm.counts import lm_side_flops

pytestmark = pytest.mark.usefixtures("one_thread")
PAPER = dict(h=5120, d_img=1792, r_xc=0.2, r_xf=0.5)  # Qwen-14B, EVA2-CLIP-E, [paper] r_xc, r_xf


@pytest.mark.parametrize(("s_img", "paper"), [(256, 0.24), (1024, 0.077)])
def test_flops_ratio_reproduces_the_papers_settings(s_img, paper):
    """Pre-training: 256 image tokens, 64 text; continual pre-training: 1,024 image tokens. Only the
    SwiGLU FFN with s_q = s_txt (the 16 media tokens counted inside the 64) gives the paper's numbers."""
    r = lm_side_flops(s_img, 64, **PAPER)["ratio"]
    assert round(r, 2 if paper > 0.1 else 3) == paper
    assert r == pytest.approx({256: 0.2393, 1024: 0.0769}[s_img], abs=5e-5)
    apart = lm_side_flops(s_img, 64, **PAPER, s_q=80)["ratio"]  # media tokens counted apart
    gelu = lm_side_flops(s_img, 64, **PAPER, ffn="gelu")["ratio"]
    assert apart == pytest.approx({256: 0.2969, 1024: 0.0935}[s_img], abs=5e-5)
    assert gelu == pytest.approx({256: 0.2310, 1024: 0.0745}[s_img], abs=5e-5)
    assert analytic(evlm_14b(), s_img, 64)["ratio"] == r  # the evlm_14b config is the paper's widths


def test_flops_terms_by_hand():
    """One layer, tiny numbers: concat = 24 s h^2 + 4 s^2 h; xattn as eq. 2 term by term."""
    f = lm_side_flops(4, 2, h=10, d_img=5, r_xc=0.5, r_xf=0.5, ffn="gelu")
    assert f["concat"] == 24 * 6 * 100 + 4 * 36 * 10
    assert (
        f["xattn"] == 4 * (6 + 0.5 + 0.5) * 2 * 100 + 4 * 4 * 10 + 4 * 0.5 * 2 * 4 * 10 + 4 * 0.5 * 4 * 5 * 10
    )


def test_both_readers_share_the_frozen_lm_and_train_only_their_fusion():
    cfg = EfficiencyConfig().model_config()
    xattn, concat = build_reader("xattn", cfg, 0), build_reader("concat", cfg, 0)
    assert concat.lm.model.embed_tokens.weight.equal(xattn.evlm.lm.model.embed_tokens.weight)
    assert concat.lm.model.layers[0].mlp.up_proj.weight.equal(
        xattn.evlm.lm.model.layers[0].layer.mlp.up_proj.weight
    )
    assert not any(p.requires_grad for p in concat.lm.parameters())
    assert {n.split(".")[0] for n, p in concat.named_parameters() if p.requires_grad} == {"proj"}
    trainable = [n for n, p in xattn.named_parameters() if p.requires_grad]
    assert trainable and all(".xattn." in n or n.endswith("media_tokens") for n in trainable)


def test_efficiency_record_has_both_ratios_per_setting():
    from eve_ds.train.distributed import init_distributed

    init_distributed("cpu", timeout_s=60)
    ec = EfficiencyConfig(
        hidden=40, layers=1, batch=2, warmup_steps=1, steps=1, settings=[["pre-training", 32, 8]]
    )
    record = run_efficiency(ec)
    (row,) = record["rows"]
    assert row["paper_ratio"] == 0.24 and row["flops_ratio_paper_widths"]["ratio"] == pytest.approx(
        lm_side_flops(32, 8, **PAPER)["ratio"]
    )
    assert row["step_time_ratio"] > 0 and row["times"]["concat"]["step_s"] > 0
    assert torch.isfinite(torch.tensor(row["forward_time_ratio"]))
    assert "| pre-training | 32 / 8 | 0.24 |" in to_markdown(record, "eve-bench --family evlm")
