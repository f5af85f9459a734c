"""The pre-training loop: DeepSpeed engine, exact resume, signals, non-finite losses, validation, logging."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from eve_ds.convert import resume_options
from eve_ds.data import (
    batch_to_device,
    build_train_loader,
    build_val_loader,
    ensure_synthetic_corpus,
    load_tokenizer,
)
from eve_ds.data.pipeline import mixture
from eve_ds.objectives import PretrainingModel
from eve_ds.objectives.flops import TextShape, flops_per_pair, peak_tflops
from eve_ds.tasks.task import Task, TaskContext, build_task
from eve_ds.train import EXIT_PREEMPTED
from eve_ds.train.checkpoint import CheckpointManager, latest_complete
from eve_ds.train.config import ConfigError, RunConfig, save_config
from eve_ds.train.distributed import all_reduce_max, barrier, init_distributed, resolve_device
from eve_ds.train.engine import build_engine, fit_micro_batch, grad_accum_steps
from eve_ds.train.metrics import MetricsWriter, setup_logging
from eve_ds.train.preflight import start_problems
from eve_ds.train.validation import attribute_ids_if_synthetic, evaluate
from eve_ds.utils.io import atomic_write_json
from eve_ds.utils.ranks import expert_parallel_rank

logger = logging.getLogger(__name__)

EXIT_OK = 0


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        problems = start_problems(cfg)  # before anything costs time: data, engine, GPUs
        if problems:
            raise ConfigError("; ".join(problems))
        self.device = resolve_device(cfg.train.device)
        if cfg.train.deterministic:
            make_deterministic(self.device)
        self.denv = init_distributed(self.device, cfg.train.dist_timeout_s)
        self.rank, self.world = self.denv.rank, self.denv.world_size
        setup_logging(self.rank, self.run_dir)
        cfg.train.micro_batch_size = fit_micro_batch(cfg, self.world)
        self.accum = grad_accum_steps(cfg, self.world)
        self._check_layout()
        self.stop_signal: int | None = None
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.rank, cfg.train.keep_last)
        self.resume_from = latest_complete(self.run_dir / "checkpoints")
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.task = self._prepare_task()
        if cfg.optim.warmup_ratio is not None:  # after the task derived max_steps from its epochs
            cfg.optim.warmup_steps = round(cfg.optim.warmup_ratio * cfg.train.max_steps)
            logger.info(
                "warm-up: %d steps (optim.warmup_ratio=%g)", cfg.optim.warmup_steps, cfg.optim.warmup_ratio
            )
        self._build_model()
        self.engine, _, self.scheduler, ds_config = build_engine(cfg, self.model, self.world, self.device)
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        self.state = {
            "step": 0,
            "batches_consumed": 0,
            "samples_seen": 0,
            "skipped_nonfinite": 0,
            "skipped_samples": 0,
            "world_size": self.world,
            "num_workers": cfg.data.num_workers,
        }
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "ds_config.json", ds_config)
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, cfg.wandb, cfg.to_dict())

    def _check_layout(self) -> None:
        ep = self.cfg.model.ep_size
        if self.world % ep:
            raise ValueError(f"model.ep_size={ep} must divide the world size {self.world}")
        logger.info(
            "layout: world %d = data-parallel %d; expert-parallel %d x expert-data-parallel %d; "
            "micro-batch %d x grad-accum %d x %d ranks = global batch %d",
            self.world,
            self.world,
            ep,
            self.world // ep,
            self.cfg.train.micro_batch_size,
            self.accum,
            self.world,
            self.cfg.train.global_batch_size,
        )

    def _prepare_task(self) -> Task | None:
        """The downstream task (None for pre-training): its data read (rank 0 generates a synthetic set
        first), the objective options its data decides, and the step count derived from its epochs."""
        cfg = self.cfg
        ctx = TaskContext(
            tokenizer=self.tokenizer,
            cache_dir=cfg.data.cache_dir,
            image_size=cfg.model.image_size,
            max_text_len=cfg.model.max_text_len,
            seed=cfg.train.seed,
            num_workers=cfg.data.num_workers,
            hflip=cfg.data.hflip,
            image_mean=cfg.data.image_mean,
            image_std=cfg.data.image_std,
        )
        task = build_task(cfg.task, ctx)
        if task is None:
            return None
        if cfg.objective.objectives != list(task.objectives):
            want = "[" + ", ".join(task.objectives) + "]"
            raise ConfigError(
                f"objective.objectives={cfg.objective.objectives} but task.name={cfg.task.name} trains "
                f"{want}: set objective.objectives={want}"
            )
        for rank_turn in (0, 1):  # rank 0 generates what is missing; then the others read it
            if (self.rank == 0) == (rank_turn == 0):
                task.prepare()
            barrier()
        for key, value in task.objective_options().items():
            setattr(cfg.objective, key, value)
        n = len(task.train_dataset()[0])
        if cfg.train.max_steps is None:
            cfg.train.max_steps = max(1, math.ceil(cfg.task.epochs * n / cfg.train.global_batch_size))
        logger.info(
            "task %s: %d training examples, %d steps (%.2f epochs of global batch %d)",
            cfg.task.name,
            n,
            cfg.train.max_steps,
            cfg.train.max_steps * cfg.train.global_batch_size / n,
            cfg.train.global_batch_size,
        )
        return task

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical non-expert init on every rank
        self.model = PretrainingModel(cfg.model, cfg.objective)
        self.model.encoder.grad_checkpointing = cfg.train.grad_checkpointing
        ep_rank = expert_parallel_rank(self.rank, cfg.model.ep_size)
        # Weights must be final before deepspeed.initialize: ZeRO copies them into its fp32 partitions.
        self.model.init_experts(ep_rank)
        if cfg.train.init_from and self.resume_from is None:
            from eve_ds.convert import load_init_weights

            report = load_init_weights(self.model, cfg.train.init_from, ep_rank=ep_rank)
            logger.info("initialised from %s: %s", cfg.train.init_from, report)
        n = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "model %s: %.1fM parameters on this rank (ep_size=%d)",
            cfg.model_flavor,
            n / 1e6,
            cfg.model.ep_size,
        )

    # -- resume -------------------------------------------------------------------------------------------

    def _resume(self) -> bool:
        """Load the newest complete checkpoint, if any. RNG streams are restored later (see train)."""
        if self.resume_from is None:
            return False
        tag = self.resume_from
        # Optimizer state is not loaded when a reshard dropped it or the layout (world, ep_size) changed.
        opts = resume_options(tag, world_size=self.world, ep_size=self.cfg.model.ep_size)
        self.engine.load_checkpoint(str(tag.parent), tag=tag.name, **opts)
        saved = json.loads((tag / "trainer_state.json").read_text())
        if saved["world_size"] != self.world:
            logger.warning(
                "resuming with world size %d (saved: %d): weights and optimizer state carry over; "
                "the data stream is re-derived for the new layout",
                self.world,
                saved["world_size"],
            )
        # The data loader compares its layout with the saved one (`saved_layout`) and says what changed.
        self.state.update(saved, world_size=self.world, num_workers=self.cfg.data.num_workers)
        self.metrics.truncate_after(self.state["step"])
        logger.info("resumed from %s (step %d)", tag, self.state["step"])
        return True

    def _train_loader(self):
        """The task's examples, or the pre-training corpora (the synthetic one generated first)."""
        cfg, t = self.cfg, self.cfg.train
        if self.task is not None:
            loader = self.task.train_loader(
                batch_size=t.micro_batch_size,
                rank=self.rank,
                world_size=self.world,
                start_batch=self.state["batches_consumed"],
            )
            self.state["data_layout"] = {"task": cfg.task.name, "examples": len(loader.dataset)}
            self.epoch_samples = len(loader.dataset)
            return loader
        if cfg.data.synthetic and self.rank == 0:  # generate once, before the other ranks look for it
            ensure_synthetic_corpus(
                cfg.data.cache_dir,
                cfg.data.synthetic_num_train,
                cfg.data.synthetic_num_val,
                cfg.data.synthetic_seed,
                cfg.model.image_size,
            )
        barrier()
        loader = build_train_loader(
            cfg.data,
            image_size=cfg.model.image_size,
            max_text_len=cfg.model.max_text_len,
            batch_size=t.micro_batch_size,
            rank=self.rank,
            world_size=self.world,
            seed=t.seed,
            start_batch=self.state["batches_consumed"],
            tokenizer=self.tokenizer,
            saved_layout=self.state.get("data_layout"),
        )
        self.state["data_layout"] = loader.layout
        self.epoch_samples = loader.num_samples
        self._log_mixture(loader.dataset.corpora)
        return loader

    def _log_mixture(self, corpora) -> None:
        rows, steps = mixture(corpora, self.cfg.train.global_batch_size)
        for r in rows:
            logger.info(
                "corpus %s: %d pairs in %d shards, weight %g -> %.1f%% of samples",
                r["name"],
                r["pairs"],
                r["shards"],
                r["weight"],
                100 * r["fraction"],
            )
        logger.info("one epoch of the corpus union = %d steps", steps)

    def save(self) -> Path:
        eve_config = {
            "model": self.cfg.model.to_dict(),
            "objective": vars(self.cfg.objective),
            "run": self.cfg.to_dict(),
        }
        if self.task is not None:  # e.g. the VQA answer vocabulary: travels with checkpoints and exports
            eve_config["task"] = {"name": self.cfg.task.name, **self.task.assets()}
        return self.ckpt.save(self.engine, self.state["step"], dict(self.state), eve_config)

    # -- signals ------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        logger.warning("received %s: finishing the current step, then saving", signal.Signals(signum).name)
        self.stop_signal = signum

    def _install_signal_handlers(self) -> None:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(s, self._on_signal)

    # -- loop ---------------------------------------------------------------------------------------------

    def _micro_step(self, data_iter) -> dict | None:
        """One micro-batch forward/backward. None when the loss was non-finite on any rank (skipped:
        no backward, no engine.step — DeepSpeed's counters do not move, the next micro-batch takes its
        place)."""
        batch = next(data_iter)
        self.state["batches_consumed"] += 1
        while batch is None:  # a task batch whose every image was unreadable
            self.state["skipped_samples"] += self.cfg.train.micro_batch_size
            batch = next(data_iter)
            self.state["batches_consumed"] += 1
        self.state["skipped_samples"] += int(batch.get("num_skipped", 0))
        # For the FLOP count (MFU): real tokens per caption and the batch's padded length (its longest text).
        self.text_tokens = float(batch["text_mask"].sum(1).float().mean())
        self.text_len = int(batch["text_ids"].shape[1])
        data = self.cfg.data
        out = self.engine(batch_to_device(batch, self.device, self.dtype, data.image_mean, data.image_std))
        bad = all_reduce_max(0.0 if bool(torch.isfinite(out["loss"])) else 1.0, self.device)
        if bad:
            return None
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def _train_step(self, data_iter) -> dict:
        """One optimizer step of `accum` micro-batches -> metrics averaged over them."""
        outs, consecutive = [], 0
        lr = self.scheduler.get_last_lr()[0]  # the LR this step applies
        while len(outs) < self.accum:
            out = self._micro_step(data_iter)
            if out is None:
                self.state["skipped_nonfinite"] += 1
                consecutive += 1
                last = latest_complete(self.run_dir / "checkpoints")
                logger.warning("non-finite loss: micro-batch skipped (%d in a row)", consecutive)
                if consecutive >= self.cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{consecutive} non-finite losses in a row at step {self.state['step']}; last good "
                        f"checkpoint: {last if last else 'none'}"
                    )
                continue
            consecutive = 0
            outs.append(out)
        self.state["step"] = int(self.engine.global_steps)
        self.state["samples_seen"] += self.cfg.train.global_batch_size
        # Every scalar an objective reports (losses, accuracies, task metrics) and the expert loads.
        keep = [k for k, v in outs[0].items() if is_scalar(v) or k.startswith("expert_load")]
        return {"lr": lr, **{k: sum(o[k].detach().float() for o in outs) / len(outs) for k in keep}}

    def _log(self, step: int, m: dict, window_samples: int, window_s: float) -> None:
        keys = sorted(k for k in m if not k.startswith("expert_load") and k != "lr")
        vec = torch.stack([m[k].reshape(()) for k in keys]).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(vec)
            vec /= self.world
        record = {"step": step, **dict(zip(keys, vec.tolist()))}
        for k in m:
            if k.startswith("expert_load"):
                record[f"{k}/image"], record[f"{k}/text"] = m[k][0].tolist(), m[k][1].tolist()
        record.update(
            lr=m["lr"],
            grad_norm=_float(self.engine.get_global_grad_norm()),
            samples_per_s=window_samples / max(window_s, 1e-9),
            skipped_samples=self.state["skipped_samples"],
            skipped_nonfinite=self.state["skipped_nonfinite"],
            epoch=self.state["samples_seen"] / max(1, self.epoch_samples),
        )
        if self.device == "cuda":
            record["mfu"] = self._mfu(record["samples_per_s"])
        self.metrics.log(record)
        return record

    def _mfu(self, samples_per_s: float) -> float | None:
        """Model FLOPs utilisation: pairs/s x FLOPs per pair / (peak bf16 FLOP/s x GPUs). The FLOP formula
        (matmuls only, training = 3 x forward) is stated in eve_ds/objectives/flops.py."""
        peak = peak_tflops(torch.cuda.get_device_name())
        if peak is None:
            return None
        text = TextShape(padded=self.text_len, real=round(self.text_tokens))
        flops = flops_per_pair(self.cfg.model, self.cfg.objective, text, self.cfg.train.micro_batch_size)
        return samples_per_s * flops / (peak * 1e12 * self.world)

    def validate(self) -> dict:
        if self.task is not None:
            m = self.task.evaluate(
                self.engine.module,
                self.cfg.task.eval_split,
                device=self.device,
                dtype=self.dtype,
                batch_size=self.cfg.train.micro_batch_size,
            )
            self.metrics.log({"step": self.state["step"], **{f"val/{k}": v for k, v in m.items()}})
            logger.info("validation at step %d: %s", self.state["step"], _fmt(m))
            return m
        spec = self._val_spec()
        if spec is None:
            return {}
        loader = build_val_loader(
            spec,
            image_size=self.cfg.model.image_size,
            max_text_len=self.cfg.model.max_text_len,
            batch_size=self.cfg.train.micro_batch_size,
            rank=self.rank,
            world_size=self.world,
            tokenizer=self.tokenizer,
        )
        attr = attribute_ids_if_synthetic(self.cfg.data, self.tokenizer)
        m = evaluate(
            self.engine.module,
            loader,
            device=self.device,
            dtype=self.dtype,
            seed=self.cfg.train.seed,
            max_batches=self.cfg.train.eval_batches,
            attr_token_ids=attr,
            image_norm=(self.cfg.data.image_mean, self.cfg.data.image_std),
        )
        self.metrics.log({"step": self.state["step"], **{f"val/{k}": v for k, v in m.items()}})
        logger.info("validation at step %d: %s", self.state["step"], _fmt(m))
        return m

    def _val_spec(self) -> str | None:
        from eve_ds.data import resolve_val_spec

        return resolve_val_spec(self.cfg.data, self.cfg.model.image_size)

    def train(self) -> int:
        t = self.cfg.train
        resumed = self._resume()
        start = self.state["step"]
        end = min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
        if start >= t.max_steps:
            logger.info("run in %s is already complete (step %d of %d)", self.run_dir, start, t.max_steps)
            return self._finish(final=not (self.run_dir / "final_metrics.json").exists(), saved=True)
        loader = self._train_loader()
        data_iter = iter(loader)
        if resumed:  # after iter(): creating the loader iterator draws from the torch RNG
            self.ckpt.load_rng(self.resume_from)
        self._install_signal_handlers()
        self.engine.train()
        bar = tqdm(total=t.max_steps, initial=start, disable=self.rank != 0, dynamic_ncols=True, desc="train")
        window_t, window_n = time.perf_counter(), 0
        saved = False
        step = start
        while step < end:
            m = self._train_step(data_iter)
            step = self.state["step"]
            saved = False
            window_n += t.global_batch_size
            bar.update(1)
            if step % t.log_every == 0 or step == end:
                rec = self._log(step, m, window_n, time.perf_counter() - window_t)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", sps=f"{rec['samples_per_s']:.0f}")
                window_t, window_n = time.perf_counter(), 0
            if step % t.eval_every == 0 and step < t.max_steps:
                self.validate()
            if all_reduce_max(1.0 if self.stop_signal else 0.0, self.device):
                bar.close()
                self.save()
                logger.warning("stopped by a signal after step %d; exit code %d", step, EXIT_PREEMPTED)
                return EXIT_PREEMPTED
            if step % t.checkpoint_every == 0 or step == end:
                if step == t.max_steps:
                    self.final_val = self.validate()
                self.save()
                saved = True
        bar.close()
        return self._finish(final=step >= t.max_steps, saved=saved)

    def _finish(self, final: bool, saved: bool) -> int:
        if final:  # validation is collective: every rank takes part
            m = getattr(self, "final_val", None) or self.validate()
            if self.rank == 0:
                last = self._last_train_record()
                atomic_write_json(
                    self.run_dir / "final_metrics.json",
                    {"step": self.state["step"], **{f"train_{k}": v for k, v in last.items()}, **m},
                )
        self.metrics.close()
        if self.rank == 0:
            ckpt = latest_complete(self.run_dir / "checkpoints")
            logger.info(
                "done. run dir: %s | checkpoint: %s | metrics: %s",
                self.run_dir,
                ckpt,
                self.run_dir / "metrics.jsonl",
            )
        return EXIT_OK

    def _last_train_record(self) -> dict:
        path = self.run_dir / "metrics.jsonl"
        last = {}
        if path.exists():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if "loss" in rec:
                    last = {k: v for k, v in rec.items() if k == "loss" or k.endswith(("_loss", "_acc"))}
        return last


def make_deterministic(device: str) -> None:
    """Same inputs, same bits: deterministic kernels, and one CPU thread (the split of a reduction over
    threads changes its rounding). cuBLAS needs a fixed workspace for deterministic matmuls."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    if device == "cpu":
        torch.set_num_threads(1)


def is_scalar(v) -> bool:
    """A 0-d tensor: what the trainer and the evaluation average and log from an objective's outputs."""
    return isinstance(v, torch.Tensor) and v.ndim == 0


def _fmt(m: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _float(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
