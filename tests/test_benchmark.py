"""The Table 1 benchmark: the --quick CPU smoke test through main([...]) and the FLOPs model."""

from __future__ import annotations

import json
import math

import pytest

from eve_ds.bench.throughput import DEFAULT_TASK_SETS, search_max_batch
from eve_ds.cli.bench import main
from eve_ds.models.config import get_config
from eve_ds.objectives import ObjectiveConfig
from eve_ds.objectives.flops import TextShape, flops_per_pair
from eve_ds.repro import paper
from eve_ds.train.mfu import peak_tflops
from eve_ds.utils.task_sets import parse_task_sets

ROW_FIELDS = {
    "task_set",
    "max_micro_batch",
    "pairs_per_s",
    "hours_per_epoch",
    "ratio_to_msm",
    "gflops_per_pair",
    "mfu",
}
LOSS_KEY = {
    "mlm": "mlm_loss",
    "mim_pixel": "mim_pixel_loss",
    "mim_token": "mim_token_loss",
    "itc": "itc_loss",
    "itm": "itm_loss",
}


def test_quick_cpu_smoke(tmp_path):
    out, md = tmp_path / "t1.json", tmp_path / "t1.md"
    assert (
        main(["--model", "eve_tiny", "--device", "cpu", "--quick", "--json", str(out), "--markdown", str(md)])
        == 0
    )
    d = json.loads(out.read_text())
    assert {"rows", "device", "versions", "git_revision"} <= set(d)
    assert d["device"]["type"] == "cpu" and d["versions"]["deepspeed"]
    assert [r["task_set"] for r in d["rows"]] == DEFAULT_TASK_SETS
    for r in d["rows"]:
        assert set(r) >= ROW_FIELDS
        assert r["max_micro_batch"] == 4 and r["mfu"] is None
        assert r["pairs_per_s"] > 0 and r["gflops_per_pair"] > 0
        assert r["hours_per_epoch"] == pytest.approx(10_000_000 / (r["pairs_per_s"] * 8) / 3600)
        assert {"loss", *(LOSS_KEY[t] for t in r["task_set"])} <= set(r["losses"]), r["losses"]
        assert all(math.isfinite(v) for v in r["losses"].values()), r["losses"]
    msm = next(r for r in d["rows"] if r["task_set"] == ["mlm", "mim_pixel"])
    assert msm["ratio_to_msm"] == 1.0
    full = next(r for r in d["rows"] if r["task_set"] == ["mlm", "itc", "itm", "mim_pixel"])
    assert full["ratio_to_msm"] == pytest.approx(msm["pairs_per_s"] / full["pairs_per_s"])
    # the FLOPs model orders the rows as the paper's costs do
    g = {tuple(r["task_set"]): r["gflops_per_pair"] for r in d["rows"]}
    assert g[("mlm",)] < g[("mlm", "mim_pixel")] < g[("mlm", "mim_token")] < g[("mlm", "itc", "itm")]
    assert g[("mlm", "itc", "itm")] < g[("mlm", "itc", "itm", "mim_pixel")]
    text = md.read_text()
    assert "| MLM + MIM (pixel) (MSM, EVE) | 4 (fixed) |" in text and "224 / 2.14" in text
    # a CPU table holds what was measured: no hours on GPUs extrapolated from it, no MFU
    header = next(line for line in text.splitlines() if line.startswith("| Pre-training tasks"))
    assert (
        header
        == "| Pre-training tasks | Batch | Pairs/s | × MSM time | GFLOPs / pair | Paper: batch / hours |"
    )
    assert "GPUs" not in text.split("\n\n")[0] and "hours/epoch" not in text
    assert f"- command: `eve-bench --model eve_tiny --device cpu --quick --json {out}" in text
    # rows of separate runs (one per GPU job) merge into one table with the ratios recomputed
    part = {**d, "rows": [r for r in d["rows"] if r["task_set"] != ["mlm", "mim_pixel"]]}
    (tmp_path / "b.json").write_text(json.dumps(part))
    (tmp_path / "a.json").write_text(json.dumps({**d, "rows": [msm]}))
    merged = tmp_path / "m.json"
    assert main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(merged)]) == 0
    m = json.loads(merged.read_text())
    assert [r["task_set"] for r in m["rows"]] == DEFAULT_TASK_SETS
    assert [r["ratio_to_msm"] for r in m["rows"]] == pytest.approx([r["ratio_to_msm"] for r in d["rows"]])


def test_quick_needs_no_json_and_errors_are_one_line(tmp_path, capsys):
    """--json is optional: the table is printed either way; usage names the command; a bad --merge input
    is one line, exit 2."""
    argv = ["--model", "eve_tiny", "--device", "cpu", "--quick", "--task-sets", "mlm", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| MLM | 4 (fixed) |" in out and f"- command: `eve-bench {' '.join(argv)}`" in out
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: eve-bench ")
    missing = tmp_path / "missing.json"
    assert main(["--merge", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eve-bench: error: --merge: ") and str(missing) in err[0]


def test_flops_match_a_hand_count_for_mlm_on_eve_tiny():
    # eve_tiny: P = 16 patches of 16x16x3, D = 128, F = 512, 4 blocks (block 3 soft: E = 4, top-2),
    # V = 30522. Text: 40 positions, 32 real -> MLM masks round(0.5 * 30) = 15 tokens.
    cfg = get_config("eve_tiny")
    patch = 2 * 16 * 768 * 128
    N = 17 + 40
    attn = 8 * N * 128**2 + 4 * N**2 * 128
    hard = 4 * N * 128 * 512
    T = 17 + 32  # real tokens reach the router and the experts
    soft = 2 * T * 128 * 4 + 2 * 4 * T * 128 * 512
    head = 2 * 15 * (128 * 128 + 128 * 30522)
    forward = patch + 4 * attn + 3 * hard + soft + head
    assert forward == 227_947_008
    got = flops_per_pair(cfg, ObjectiveConfig(objectives=["mlm"]), TextShape(40, 32), batch=4)
    assert got == 3 * forward


def test_flops_of_mim_pixel_use_the_visible_patches_only():
    cfg = get_config("eve_tiny")
    obj = ObjectiveConfig(objectives=["mim_pixel"])
    # 4 of 16 patches visible: encoder over 5 + 40 tokens; decoder over all 17 tokens, width 128, 2 blocks
    N, T, w, M = 45, 5 + 32, 128, 17
    enc = 2 * 16 * 768 * 128 + 4 * (8 * N * 128**2 + 4 * N**2 * 128) + 3 * 4 * N * 128 * 512
    enc += 2 * T * 128 * 4 + 2 * 4 * T * 128 * 512
    dec = 2 * 5 * 128 * w + 2 * (8 * M * w * w + 4 * M * M * w + 16 * M * w * w) + 2 * M * w * 768
    assert flops_per_pair(cfg, obj, TextShape(40, 32), batch=4) == 3 * (enc + dec)


def test_peak_flops_by_device_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Intel Xeon") is None


@pytest.mark.parametrize("largest", [1, 3, 37, 224, 500, 2048])
def test_max_batch_search_finds_the_largest_fitting_batch(largest):
    tried = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= largest

    got = search_max_batch(fits, start=32, limit=2048, granularity=4)
    assert largest - 4 < got <= largest if largest > 4 else got == largest
    assert len(tried) < 20


def test_parse_task_sets():
    """One grammar for eve-bench and eve-ablations: space-separated sets, `none` = no pre-training, and a
    `;` inside an argument (eve-bench's older spelling) splits too."""
    assert parse_task_sets(["mlm,mim_pixel", "mlm,itc,itm", "none"]) == [
        ["mlm", "mim_pixel"],
        ["mlm", "itc", "itm"],
        [],
    ]
    assert parse_task_sets("mlm,mim_pixel; mlm,itc,itm") == [["mlm", "mim_pixel"], ["mlm", "itc", "itm"]]
    assert parse_task_sets(["mlm,mim_pixel;mlm", "itc"]) == [["mlm", "mim_pixel"], ["mlm"], ["itc"]]


def test_default_task_sets_are_the_papers_rows_and_mlm():
    assert [*(list(k) for k in paper.TABLE1), ["mlm"]] == DEFAULT_TASK_SETS


def test_eve_profile_regions_and_engine_split_on_cpu(tmp_path, capsys):
    """eve-profile times every region call of one MSM step (4 blocks x 2 passes of attention, 3 + 3
    hard-router and 1 + 1 soft-router calls on eve_tiny) and splits the engine's step; --set reaches the
    model config."""
    from eve_ds.cli.profile import main as profile

    out = tmp_path / "p.json"
    args = ["--model", "eve_tiny", "--batch-size", "2", "--reps", "1", "--steps", "1", "--json", str(out)]
    assert profile([*args, "--set", "expert_impl=loop"]) == 0
    d = json.loads(out.read_text())
    calls = {k: v["calls"] for k, v in d["regions_ms"].items()}
    assert calls == {
        "attention": 8,
        "hard-router FFN": 6,
        "soft-router FFN (MoE)": 2,
        "MLM head": 1,
        "pixel decoder": 1,
    }
    assert all(v["ms"] > 0 for v in d["regions_ms"].values())
    assert d["regions_sum_ms"] == pytest.approx(sum(v["ms"] for v in d["regions_ms"].values()))
    assert set(d["engine_step_ms"]) == {"forward", "backward", "optimizer step"}
    assert d["overrides"] == ["expert_impl=loop"] and d["meta"]["device"]["type"] == "cpu"
    assert "sum of regions" in capsys.readouterr().out


def test_region_replay_runs_the_backward():
    """A replayed region call is timed forward + backward: its parameters receive gradients."""
    import torch

    from eve_ds.bench.profile import Timer, capture_calls, time_call
    from eve_ds.bench.throughput import BenchConfig, build_model, memory_batches

    cfg, obj = get_config("eve_tiny"), ObjectiveConfig(objectives=["mlm", "mim_pixel"])
    model = build_model(cfg, obj, 0)
    batch = next(memory_batches(cfg, obj, 2, BenchConfig(), torch.float32, num_batches=1))
    calls = capture_calls(model, lambda: model(batch, generator=torch.Generator().manual_seed(0)))
    for region in ("attention", "soft-router FFN (MoE)"):
        call = next(c for c in calls if c.region == region)
        assert time_call(call, Timer("cpu"), reps=1) > 0
        assert all(p.grad is not None for p in call.module.parameters() if p.requires_grad), region
