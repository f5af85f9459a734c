"""The training loop of every task (pre-training included): DeepSpeed engine, exact resume, signals,
non-finite losses, validation, logging. The task (`eve_ds/tasks/`) brings the data and the validation, the
model family (`train/family.py`) the model."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from eve_ds.convert import read_source_config, resume_options
from eve_ds.data import batch_to_device, load_tokenizer
from eve_ds.data.transforms import pad_text
from eve_ds.tasks.base import Task, build_task
from eve_ds.train import EXIT_INTERRUPTED, EXIT_PREEMPTED
from eve_ds.train.checkpoint import CheckpointManager, latest_complete
from eve_ds.train.compile import static_text_len
from eve_ds.train.config import ConfigError, RunConfig, resolve, save_config, task_context
from eve_ds.train.distributed import all_reduce_max, barrier, init_distributed, resolve_device
from eve_ds.train.engine import build_engine, nonfinite
from eve_ds.train.family import family_of
from eve_ds.train.metrics import MetricsWriter, setup_logging
from eve_ds.train.mfu import peak_tflops
from eve_ds.train.preflight import start_problems
from eve_ds.train.run_guard import CHANGES_FILE, check_resume, check_run_dir, is_changeable, record_changes
from eve_ds.utils.io import atomic_write_json
from eve_ds.utils.ranks import expert_parallel_rank

logger = logging.getLogger(__name__)

EXIT_OK = 0


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, allow_changes: bool = False) -> None:
        """`cfg` as loaded; `self.cfg` is it resolved for this world size and task (what runs and what
        config.yaml records). `allow_changes`: a resumed run may take new values of the keys in
        `run_guard.CHANGEABLE` (else they are refused, as every other changed key always is)."""
        self.run_dir = Path(run_dir)
        check_run_dir(self.run_dir, cfg.task.name, cfg.model_flavor)  # before anything is written there
        problems = start_problems(cfg)  # before anything costs time: data, engine, GPUs
        if problems:
            raise ConfigError("; ".join(problems))
        self.device = resolve_device(cfg.train.device)
        if cfg.train.deterministic:
            make_deterministic(self.device)
        elif cfg.train.num_threads:
            torch.set_num_threads(cfg.train.num_threads)
        self.denv = init_distributed(self.device, cfg.train.dist_timeout_s)
        self.rank, self.world = self.denv.rank, self.denv.world_size
        setup_logging(self.rank, self.run_dir)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.task = self._prepare_task(cfg)
        self.cfg = cfg = resolve(cfg, self.world, self.task)
        self._check_layout()
        self.stop_signal: int | None = None
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", self.rank, cfg.train.keep_last)
        self.resume_from = latest_complete(self.run_dir / "checkpoints")
        self.changes = self._check_resume(allow_changes)
        self.family = family_of(cfg)
        self._build_model()
        self.engine, _, self.scheduler, ds_config = build_engine(cfg, self.model, self.world, self.device)
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        self.state = {
            "step": 0,
            "batches_consumed": 0,
            "samples_seen": 0,
            "skipped_nonfinite": 0,
            "skipped_updates": 0,
            "skipped_samples": 0,
            "world_size": self.world,
            "num_workers": cfg.data.num_workers,
        }
        if self.rank == 0:
            save_config(cfg, self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "ds_config.json", ds_config)
        self.metrics = MetricsWriter(self.run_dir, self.rank == 0, cfg.wandb, cfg.to_dict())
        # Optimizer updates skipped for non-finite gradients since the last read: a device scalar, added to
        # state["skipped_updates"] at log and checkpoint time only (`_read_skipped_updates`).
        self.unread_skips: torch.Tensor | None = None
        # train.nonfinite_check=device: non-finite micro-batch losses since the last read, the current run of
        # them in a row and the longest run (device scalars, read at log time: `_read_nonfinite_losses`).
        self.unread_bad = self.bad_run = self.worst_run = None

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
            self.cfg.train.grad_accum_steps,
            self.world,
            self.cfg.train.global_batch_size,
        )

    def _prepare_task(self, cfg: RunConfig) -> Task:
        """The run's task (pre-training is `msm`) with its data read: rank 0 first, which generates a
        synthetic set when one is missing, then the others."""
        task = build_task(cfg.task, task_context(cfg, self.tokenizer))
        for rank_turn in (0, 1):
            if (self.rank == 0) == (rank_turn == 0):
                task.prepare()
            barrier()
        if cfg.train.init_from and task.takes_init_assets:  # e.g. an initial VQA head's answer order
            task.take_init_assets(read_source_config(cfg.train.init_from), cfg.train.init_from)
        return task

    def _build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # identical non-expert init on every rank
        self.model = self.family.build_model(cfg)
        ep_rank = expert_parallel_rank(self.rank, cfg.model.ep_size)
        self.family.init_weights(self.model, cfg, ep_rank, resuming=self.resume_from is not None)
        n = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "model %s: %.1fM parameters on this rank (ep_size=%d)",
            cfg.model_flavor,
            n / 1e6,
            cfg.model.ep_size,
        )

    # -- resume -------------------------------------------------------------------------------------------

    def _check_resume(self, allow_changes: bool) -> dict:
        """The config keys a resumed run changes (refused unless allowed; see `run_guard`)."""
        path = self.run_dir / "config.yaml"
        if self.resume_from is None or not path.is_file():
            return {}
        requested = yaml.safe_load(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        changes = check_resume(yaml.safe_load(path.read_text()) or {}, requested, allow_changes)
        for key, (old, new) in changes.items():
            logger.warning("resumed run: %s changes from %r to %r", key, old, new)
        return {k: v for k, v in changes.items() if is_changeable(k)}

    def _apply_changes(self, base_lrs: list[float]) -> None:
        """After a checkpoint restored the scheduler: the requested learning rates, from this step on,
        and the change recorded in the run directory."""
        self.scheduler.base_lrs = base_lrs  # the lambda already is the requested schedule's
        lrs = [b * f(self.scheduler.last_epoch) for b, f in zip(base_lrs, self.scheduler.lr_lambdas)]
        for group, lr in zip(self.scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs
        if self.rank == 0:
            record_changes(self.run_dir, self.state["step"], self.changes)
        logger.warning(
            "applied %s from step %d (recorded in %s)",
            ", ".join(f"{k}={new!r}" for k, (_, new) in self.changes.items()),
            self.state["step"],
            self.run_dir / CHANGES_FILE,
        )

    def _resume(self) -> bool:
        """Load the newest complete checkpoint, if any. RNG streams are restored later (see train)."""
        if self.resume_from is None:
            return False
        tag = self.resume_from
        # Optimizer state is not loaded when a reshard dropped it or the layout (world, ep_size) changed.
        opts = resume_options(tag, world_size=self.world, ep_size=self.cfg.model.ep_size)
        base_lrs = list(self.scheduler.base_lrs)  # this run's; loading the checkpoint restores the saved
        self.family.check_resume(self.engine.module, tag)
        self.engine.load_checkpoint(str(tag.parent), tag=tag.name, **opts, **self.family.load_kwargs)
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
        if self.changes:
            self._apply_changes(base_lrs)
        return True

    def _train_loader(self):
        """The task's training batches, continuing after the batches already consumed."""
        loader = self.task.train_loader(
            batch_size=self.cfg.train.micro_batch_size,
            rank=self.rank,
            world_size=self.world,
            start_batch=self.state["batches_consumed"],
            saved_layout=self.state.get("data_layout"),
        )
        self.state["data_layout"] = self.task.data_layout(loader)
        self.epoch_samples = self.task.epoch_samples(loader)
        return loader

    def _read_skipped_updates(self) -> int:
        if self.unread_skips is not None:
            self.state["skipped_updates"] += int(self.unread_skips)
            self.unread_skips = None
        return self.state["skipped_updates"]

    def save(self) -> Path:
        self._read_nonfinite_losses()
        self._read_skipped_updates()
        eve_config = self.family.checkpoint_config(self.cfg, self.engine.module)
        # e.g. the VQA answer vocabulary: travels with checkpoints and exports
        eve_config["task"] = {"name": self.cfg.task.name, **self.task.assets()}
        return self.ckpt.save(
            self.engine, self.state["step"], dict(self.state), eve_config, self.family.save_kwargs
        )

    # -- signals ------------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.stop_signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        logger.warning(
            "received %s: finishing the current step, then saving%s",
            signal.Signals(signum).name,
            " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "",
        )
        self.stop_signal = signum

    def _install_signal_handlers(self) -> None:
        """Before the data loader forks its workers: they inherit the handler, so a Ctrl-C sent to the
        whole process group does not kill them mid-batch (in a worker it only sets that copy's flag)."""
        for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
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
        self.batch_shape = self.family.batch_shape(batch)  # for the FLOP count (MFU)
        data = self.cfg.data
        if static_text_len(self.cfg.train):  # one text length: one graph per compiled block and pass
            batch = pad_text(batch, self.cfg.model.max_text_len, self.cfg.model.pad_token_id)
        out = self.engine(batch_to_device(batch, self.device, self.dtype, data.image_mean, data.image_std))
        if self.cfg.train.nonfinite_check == "device":
            self.engine.backward(self._poison_if_nonfinite(out["loss"]))
            self.engine.step()
            return out
        bad = all_reduce_max(0.0 if bool(torch.isfinite(out["loss"])) else 1.0, self.device)
        if bad:
            return None
        self.engine.backward(out["loss"])
        self.engine.step()
        return out

    def _poison_if_nonfinite(self, loss: torch.Tensor) -> torch.Tensor:
        """loss x 1, or x NaN when it is not finite, decided on the device: a finite loss back-propagates
        exactly as before (x 1.0 is exact); a non-finite one makes every gradient NaN, whatever the loss's
        own gradient would be, so the optimizer skips the update (SkipNonFiniteAdamW, DeepSpeed's wrappers)
        on every rank (the gradient all-reduce spreads the NaN). Counted for `_read_nonfinite_losses`."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(())
        if self.unread_bad is None:
            self.unread_bad, self.bad_run, self.worst_run = bad, bad, bad
        else:
            self.unread_bad = self.unread_bad + bad
            self.bad_run = (self.bad_run + 1) * bad  # resets to 0 on a finite loss
            self.worst_run = torch.maximum(self.worst_run, self.bad_run)
        return loss * torch.where(bad > 0, float("nan"), 1.0).to(loss.dtype)

    def _read_nonfinite_losses(self) -> None:
        """train.nonfinite_check=device: add the non-finite losses since the last read to
        state["skipped_nonfinite"] (the max over ranks) and stop the run when max_nonfinite_steps of them
        came in a row. One host read per log interval."""
        if self.unread_bad is None:
            return
        vec = torch.stack([self.unread_bad, self.worst_run]).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.MAX)
        bad, worst = (int(v) for v in vec.tolist())
        self.unread_bad, self.worst_run = torch.zeros_like(self.unread_bad), self.bad_run  # a run goes on
        self.state["skipped_nonfinite"] += bad
        if worst >= self.cfg.train.max_nonfinite_steps:
            last = latest_complete(self.run_dir / "checkpoints")
            raise NonFiniteLossError(
                f"{worst} non-finite losses in a row by step {self.state['step']}; last good checkpoint: "
                f"{last if last else 'none'}"
            )

    def _train_step(self, data_iter) -> dict:
        """One optimizer step of `accum` micro-batches -> metrics averaged over them."""
        outs, consecutive = [], 0
        lr = self.scheduler.get_last_lr()[0]  # the LR this step applies
        while len(outs) < self.cfg.train.grad_accum_steps:
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
        norm = self.engine.get_global_grad_norm()
        if norm is not None:  # inf/nan: the update was skipped (on the device, or by DeepSpeed)
            skipped = nonfinite(norm)
            self.unread_skips = skipped if self.unread_skips is None else self.unread_skips + skipped
        self.state["samples_seen"] += self.cfg.train.global_batch_size
        # Every scalar an objective reports (losses, accuracies, task metrics) and the expert loads.
        keep = [k for k, v in outs[0].items() if is_scalar(v) or k.startswith("expert_load")]
        return {"lr": lr, **{k: sum(o[k].detach().float() for o in outs) / len(outs) for k in keep}}

    def _log(self, step: int, m: dict, window_samples: int, window_s: float) -> None:
        self._read_nonfinite_losses()
        keys = sorted(k for k in m if not k.startswith("expert_load") and k != "lr")
        vec = torch.stack([m[k].reshape(()) for k in keys]).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(vec)
            vec /= self.world
        record = {"step": step, **dict(zip(keys, vec.tolist()))}
        for k in m:
            if k.startswith("expert_load"):  # EVE: (2, E) image / text rows; EVLM: (1, E), all tokens
                rows = ("image", "text") if m[k].shape[0] == 2 else ("all",)
                record.update({f"{k}/{r}": m[k][i].tolist() for i, r in enumerate(rows)})
        record.update(
            lr=m["lr"],
            grad_norm=_float(self.engine.get_global_grad_norm()),
            samples_per_s=window_samples / max(window_s, 1e-9),
            skipped_samples=self.state["skipped_samples"],
            skipped_nonfinite=self.state["skipped_nonfinite"],
            skipped_updates=self._read_skipped_updates(),
            epoch=self.state["samples_seen"] / max(1, self.epoch_samples),
        )
        if self.device == "cuda":
            record["mfu"] = self._mfu(record["samples_per_s"])
        self.metrics.log(record)
        return record

    def _mfu(self, samples_per_s: float) -> float | None:
        """Model FLOPs utilisation: samples/s x FLOPs per sample / (peak bf16 FLOP/s x GPUs). The family
        counts the FLOPs (EVE: matmuls only, training = 3 x forward, eve_ds/objectives/flops.py)."""
        peak = peak_tflops(torch.cuda.get_device_name())
        if peak is None:
            return None
        flops = self.family.flops_per_sample(self.cfg, self.batch_shape)
        return samples_per_s * flops / (peak * 1e12 * self.world)

    def validate(self) -> dict:
        """The task's validation metrics (collective: every rank takes part); logged as val/<key>."""
        m = self.task.evaluate(
            self.engine.module,
            self.cfg.task.eval_split,
            device=self.device,
            dtype=self.dtype,
            batch_size=self.cfg.train.micro_batch_size,
        )
        if m:  # pre-training without validation shards has none
            self.metrics.log({"step": self.state["step"], **{f"val/{k}": v for k, v in m.items()}})
            logger.info("validation at step %d: %s", self.state["step"], _fmt(m))
        return m

    def train(self) -> int:
        t = self.cfg.train
        resumed = self._resume()
        start = self.state["step"]
        end = min(t.max_steps, t.stop_after) if t.stop_after else t.max_steps
        if start >= t.max_steps:
            logger.info("run in %s is already complete (step %d of %d)", self.run_dir, start, t.max_steps)
            return self._finish(final=not (self.run_dir / "final_metrics.json").exists(), saved=True)
        loader = self._train_loader()
        self._install_signal_handlers()
        data_iter = iter(loader)
        if resumed:  # after iter(): creating the loader iterator draws from the torch RNG
            self.ckpt.load_rng(self.resume_from)
        self.engine.train()
        # Log lines (validation results, warnings) go above the progress bar, each on its own line.
        with logging_redirect_tqdm():
            return self._loop(data_iter, start, end)

    def _loop(self, data_iter, start: int, end: int) -> int:
        """Steps start+1 .. end: log, validate, stop on a signal, checkpoint; -> the exit code."""
        t = self.cfg.train
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
                bar.set_postfix(
                    loss=f"{rec['loss']:.3f}",
                    sps=f"{rec['samples_per_s']:.0f}",
                    skipped=self.state["skipped_samples"],
                )
                window_t, window_n = time.perf_counter(), 0
            if step % t.eval_every == 0 and step < t.max_steps:
                self.validate()
            if all_reduce_max(1.0 if self.stop_signal else 0.0, self.device):
                bar.close()
                return self._stop(step)
            if step % t.checkpoint_every == 0 or step == end:
                if step == t.max_steps:
                    self.final_val = self.validate()
                self.save()
                saved = True
        bar.close()
        return self._finish(final=step >= t.max_steps, saved=saved)

    def _stop(self, step: int) -> int:
        """A signal asked to stop: checkpoint, say how to go on, exit non-zero (SIGTERM/SIGUSR1: the code
        a Slurm launcher requeues on; Ctrl-C: 130, as a shell reports an interrupted command)."""
        path = self.save()
        code = EXIT_INTERRUPTED if self.stop_signal == signal.SIGINT else EXIT_PREEMPTED
        logger.warning(
            "stopped at step %d (checkpoint %s); run the same command to resume (exit code %d)",
            step,
            path,
            code,
        )
        return code

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
