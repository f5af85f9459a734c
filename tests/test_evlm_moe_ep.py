"""EVLM-MoE with expert parallelism through the one trainer, on two CPU processes (gloo):

- the forward and the loss at ep_size 2 equal ep_size 1 on the same batch and weights, and every rank calls
  every MoE layer as often as the other, also when its batch has no image or no real token;
- `evlm_tiny_synthetic_moe` (upcycled from a dense run) trains at ep_size 2; stopped and resumed, it equals
  the uninterrupted run bit for bit, its final validation (greedy decoding: collective under expert
  parallelism) included, which `eve-evaluate` of the checkpoint in one process gives again;
- `eve-convert reshard` carries its checkpoint from ep_size 2 to 1 and back, bit for bit, and a run at
  ep_size 1 resumed from it goes on as the ep_size 2 run did.

The parity check runs in this file's worker mode: torchrun --nproc_per_node 2 tests/test_evlm_moe_ep.py
worker CACHE_DIR RUN_DIR OUT_FILE_PREFIX.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_convert import torchrun
from test_train import complete_steps, run_train, train_losses

from eve_ds.cli.convert import main as convert_main
from eve_ds.cli.evaluate import main as evaluate_main
from eve_ds.convert.ds_checkpoint import consolidated_state_dict
from eve_ds.data.transforms import batch_to_device
from eve_ds.tasks.evlm_synthetic.data import CaptionScenes, collate
from eve_ds.train.config import load_config
from eve_ds.train.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
CALLS = 3  # forwards per rank in the parity check


def parity_overrides(cache: str, ep_size: int, world: int) -> list[str]:
    """A tiny EVLM-MoE from scratch (experts drawn per global expert) with open gates, so that the
    cross-attention and the routed experts all reach the loss."""
    return [
        "model.flavor=evlm_tiny_moe", f"model.ep_size={ep_size}", "model.gate_init=0.5",
        "model.routed_gate_init=0.5", "stage0.enabled=false", f"data.cache_dir={cache}",
        "task.synthetic_num_train=16", "task.synthetic_num_val=4", "train.micro_batch_size=2",
        f"train.global_batch_size={2 * world}", "train.deterministic=true",
    ]  # fmt: skip


def rank_batches(trainer: Trainer, rank: int) -> list[dict]:
    """This rank's CALLS batches: (1) rank 0 two scenes with images, rank 1 two text-only rows (no image at
    all); (2) two scenes each, rows of unequal lengths (padding); (3) as (2), but rank 1's tokens all marked
    padding (`valid` False: nothing to route)."""
    task, size = trainer.task, trainer.cfg.model.image_size
    scenes = task.dataset("train")
    text = CaptionScenes(16, "train", 0, size, task.tokenizer, trainer.cfg.model.num_media_tokens, True)
    first = [text[2], text[3]] if rank == 1 else [scenes[0], scenes[1]]
    batches = [collate(first, size), collate([scenes[4 + 2 * rank], scenes[5 + 2 * rank]], size)]
    last = collate([scenes[4 + 2 * rank], scenes[5 + 2 * rank]], size)
    if rank == 1:
        last["valid"] = torch.zeros_like(last["valid"])
    return [*batches, last]


def forward_all(trainer: Trainer, forward, rank: int) -> dict:
    """Run the rank's batches through `forward` (the engine or the bare model) -> losses, logits, and the
    number of calls of every DeepSpeed MoE layer."""
    calls: dict[int, int] = {}
    hooks = [
        layer.xattn.ffn.moe.register_forward_hook(lambda m, a, o, i=i: calls.update({i: calls.get(i, 0) + 1}))
        for i, layer in enumerate(trainer.model.encoder.layers)
    ]
    out = {"losses": [], "logits": []}
    hooks.append(
        trainer.model.encoder.register_forward_hook(lambda m, a, o: out["logits"].append(o.logits.detach()))
    )
    for batch in rank_batches(trainer, rank):
        res = forward(on_device(trainer, batch))
        out["losses"].append({k: v.detach().clone() for k, v in res.items() if k.endswith("_loss")})
    for h in hooks:
        h.remove()
    return {**out, "calls": calls}


def on_device(trainer: Trainer, batch: dict) -> dict:
    """A batch as the trainer's micro-step passes it to the engine (images normalised under `image`)."""
    d = trainer.cfg.data
    return batch_to_device(batch, trainer.device, trainer.dtype, d.image_mean, d.image_std)


def worker(cache: str, run_dir: str, prefix: str) -> None:
    """A rank of the ep_size 2 engine: forwards of this rank's batches, then a step."""
    trainer = Trainer(load_config("evlm_tiny_synthetic", parity_overrides(cache, 2, 2)), Path(run_dir))
    out = forward_all(trainer, trainer.engine, trainer.rank)
    first = on_device(trainer, rank_batches(trainer, trainer.rank)[0])
    trainer.engine.backward(trainer.engine(first)["loss"])  # the text-only rank takes part in the backward
    trainer.engine.step()
    out["step"] = int(trainer.engine.global_steps)
    torch.save(out, f"{prefix}_rank{trainer.rank}.pt")


def test_ep2_forward_and_loss_equal_ep1_and_every_rank_calls_every_moe_layer_alike(tmp_path):
    cache = tmp_path / "cache"
    torchrun(__file__, "worker", str(cache), str(tmp_path / "ep2"), str(tmp_path / "out"))
    ranks = [torch.load(tmp_path / f"out_rank{r}.pt", weights_only=False) for r in range(2)]
    ref = Trainer(load_config("evlm_tiny_synthetic", parity_overrides(str(cache), 1, 1)), tmp_path / "ep1")
    for rank in range(2):
        got = ranks[rank]
        assert got["calls"] == {i: CALLS for i in range(4)}  # every layer once per forward, on both ranks
        want = forward_all(ref, ref.model, rank)
        for g, w in zip(got["losses"], want["losses"]):
            assert sorted(g) == sorted(w) == ["aux_loss", "caption_lm_loss"]
            for k in w:
                torch.testing.assert_close(g[k], w[k], atol=1e-5, rtol=1e-5, msg=f"rank {rank} {k}")
        for g, w in zip(got["logits"], want["logits"]):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert got["step"] == 1
    # The ranks saw different batches, and the routed experts matter (tanh(beta) = 0.46).
    assert ranks[0]["losses"][1]["caption_lm_loss"] != ranks[1]["losses"][1]["caption_lm_loss"]
    assert ranks[0]["losses"][0]["aux_loss"] > 0


# -- the MoE config through eve-pretrain at ep_size 2 --------------------------------------------------------


def small(cache: Path, **extra) -> list[str]:
    base = {
        "data.cache_dir": str(cache),
        "task.synthetic_num_train": 64,
        "task.synthetic_num_val": 7,  # odd: one rank's share repeats a scene, which must not count
        "train.micro_batch_size": 2,
        "train.global_batch_size": 4,
        "train.log_every": 1,
        "train.deterministic": "true",
        "optim.warmup_steps": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in base.items()]


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def final(run: Path) -> dict:
    return json.loads((run / "final_metrics.json").read_text())


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory) -> Path:
    """A 2-step dense evlm_tiny_synthetic run (after a 2-step stage 0): what the MoE stage upcycles."""
    root = tmp_path_factory.mktemp("evlm_moe_ep")
    run = root / "dense"
    args = ["--config", "evlm_tiny_synthetic", "stage0.max_steps=2", "stage0.batch_size=4"]
    ok(
        run_train(
            run, [*args, *small(root / "cache", **{"train.max_steps": 2, "train.global_batch_size": 2})]
        )
    )
    return run


def moe_args(dense: Path, **extra) -> list[str]:
    cfg = {"model.ep_size": 2, "train.max_steps": 4, "train.checkpoint_every": 2, "train.eval_every": 4}
    return ["--config", "evlm_tiny_synthetic_moe", *small(dense.parent / "cache", **{**cfg, **extra})]


def test_moe_config_trains_at_ep2_resumes_exactly_and_reshards_both_ways(dense_run, monkeypatch, capsys):
    monkeypatch.setenv("EVLM_TINY_RUN", str(dense_run))
    root = dense_run.parent
    ref, run = root / "moe_ref", root / "moe"
    ok(run_train(ref, moe_args(dense_run), nproc=2, one_thread=False))
    ok(run_train(run, moe_args(dense_run, **{"train.stop_after": 2}), nproc=2, one_thread=False))
    tag2 = run / "checkpoints" / "step_00000002"
    assert complete_steps(run) == [2] and len(list(tag2.glob("layer_*_expert_*_model_states.pt"))) == 4 * 16
    resumed = run_train(run, moe_args(dense_run), nproc=2, one_thread=False)
    ok(resumed)
    assert "resumed from" in resumed.stderr
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and losses == train_losses(ref) and len(set(losses.values())) == 4
    metrics = final(run)
    assert metrics == {**final(ref), "step": 4} and metrics["cider"] >= 0 and "vqa_colour_blind" in metrics
    # One process reads the ep_size 2 checkpoint (every expert file) and validates as the two ranks did.
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(run), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    # The blind controls roll the images within a batch (teacher-forced) or a rank's scenes (generated):
    # they pair other images with other texts on one process than on two.
    seen = [k for k in again if not k.endswith("_blind") and k != "num_samples"]
    assert len(seen) > 30 and {k: again[k] for k in seen} == pytest.approx(
        {k: metrics[k] for k in seen}, abs=1e-5
    )
    # reshard 2 -> 1 (on 2 ranks) -> 2: the same weights and optimizer shards, bit for bit
    ep1, back = root / "moe_ep1", root / "moe_ep2_again"
    assert convert_main(["reshard", str(tag2), str(ep1), "--ep-size", "1", "--strict-optimizer"]) == 0
    assert convert_main(["reshard", str(ep1), str(back), "--ep-size", "2", "--strict-optimizer"]) == 0
    tag_back = back / "checkpoints" / tag2.name
    a, _ = consolidated_state_dict(tag2, 16)
    b, _ = consolidated_state_dict(tag_back, 16)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    for r in range(2):
        name = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        x, y = (torch.load(t / name, weights_only=False)["optimizer_state_dict"] for t in (tag2, tag_back))
        for g, (p, q) in enumerate(
            zip(x["single_partition_of_fp32_groups"], y["single_partition_of_fp32_groups"])
        ):
            assert torch.equal(p, q), g
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(
                    x["base_optimizer_state"]["state"][g][k], y["base_optimizer_state"]["state"][g][k]
                )
    # ep_size 1 on the same two ranks, resumed from the 2 -> 1 checkpoint with its optimizer state
    ok(run_train(ep1, moe_args(dense_run, **{"model.ep_size": 1}), nproc=2, one_thread=False))
    assert train_losses(ep1) == pytest.approx({k: v for k, v in losses.items() if k > 2}, rel=1e-5)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
    worker(sys.argv[2], sys.argv[3], sys.argv[4])
