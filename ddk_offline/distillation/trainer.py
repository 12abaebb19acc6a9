"""Phase two: distil a student from a teacher dump, with DDK domain sampling. ``distill(config) -> summary``.

Reads top to bottom: setup (dump, sampler, student, optimiser, data; the parts come from :mod:`.setup` or are handed
in) -> loss step (:mod:`.loss`) -> loop -> cleanup.

Step ``s`` (0-based) trains on a batch drawn with the weights in force at ``s``; the sampler updates at the start of
every K-th step (and, with ``--gap-source val``, once before step 0). The next step's batch is planned and built in
the background while the current one trains, except when an update is due first (once per K steps), so the data a
run sees never depends on timing. A checkpoint holds everything that changes during the run, including the plans
already in flight, so ``--resume`` continues exactly where the run stopped (bit-identical losses on CPU).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the student is wrapped in DistributedDataParallel (gloo on CPU, NCCL on
CUDA). ``--batch-size`` is per rank: every rank draws and plans the whole global step (``batch_size * grad_accum *
world`` sequences, same seed, so cursors and sampler state are identical everywhere) and builds only its own rows.
The per-domain loss sums are all-reduced before each sampler update and each logged row, so every rank computes the
same weights and rank 0 logs the global numbers; rank 0 alone writes logs, checkpoints and the final model.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddk_offline.distillation import guards, setup
from ddk_offline.distillation.checkpoint import (
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.evaluation import domain_sums, evaluate_model
from ddk_offline.distillation.loss import LossSpec
from ddk_offline.distillation.reporters import parse_report_to
from ddk_offline.distillation.rundir import RunDir, resume_point, saved_config
from ddk_offline.distillation.runlog import DistillSummary, MetricsWriter, Window
from ddk_offline.distillation.samplers import GapStats
from ddk_offline.distillation.setup import RunParts
from ddk_offline.format.reader import open_dump
from ddk_offline.runtime import distributed
from ddk_offline.runtime.device import resolve_device
from ddk_offline.runtime.files import write_json_atomic

__all__ = ["DistillConfig", "DistillSummary", "RunParts", "Trainer", "distill"]


class Trainer:
    """One run: setup in ``__init__``, one optimiser step per :meth:`train_step`, the whole run in :meth:`run`.

    Args:
        config: the run's settings (resolved against the dump here).
        env: the torch.distributed environment (default: a single process).
        parts: components to use instead of the defaults built from ``config`` (see :class:`RunParts`).
    """

    def __init__(
        self,
        config: DistillConfig,
        env: distributed.DistEnv | None = None,
        parts: RunParts | None = None,
        say: Callable[[str], None] | None = None,
    ):
        self.env = env or distributed.DistEnv()
        #: Hooks for a front end (the CLI prints both): a status line, and each metrics row as it is logged.
        self.say: Callable[[str], None] = say or (lambda message: None)
        self.on_log: Callable[[dict[str, Any]], None] = lambda row: None
        self.run_dir = RunDir(Path(config.out))  # opened (made, locked, marked) on rank 0 once the options are checked
        try:
            self._setup(config, parts or RunParts())
        except BaseException:
            self.run_dir.discard()  # removes --out only if this process made it and holds its lock
            raise

    def close(self) -> None:
        """Release ``--out``'s lock (the end of :meth:`run`, or when a caller stops stepping)."""
        self.loader.close()
        self.run_dir.close()

    def _setup(self, config: DistillConfig, parts: RunParts) -> None:
        env = self.env
        self.reader = open_dump(config.dump)
        m = self.reader.manifest
        if config.extend and config.resume:  # only the length changes: K, warm-up and save interval stay the run's
            config = config.fill_from_checkpoint(saved_config(Path(config.out)))
        cfg = config.resolve(seq_len=m.seq_len, temperatures=list(m.temperatures), world=env.world)
        self.out = Path(cfg.out)
        ckpt = resume_point(cfg, self.out, self.env, self.reader.manifest)
        # A --resume of a finished run (its summary and final model written): run() reports it, nothing is rewritten.
        self.complete = (
            ckpt is not None
            and ckpt.step >= cfg.max_steps
            and (self.out / "summary.json").is_file()
            and (self.out / "final").is_dir()
        )
        self.cfg, self.domains = cfg, self.reader.domains
        self.loss_spec = LossSpec(
            alpha=cfg.ce_weight, gamma=cfg.kd_weight, temperature=cfg.temperature, mode=cfg.kd_mode
        )
        setup.check_dump(cfg, self.reader)
        # Every option is checked before the student loads (which can take minutes): the sampler is built first.
        self.sampler = (parts.sampler or setup.build_sampler)(cfg, self.reader)
        self.cross = setup.build_cross(cfg, self.reader, lambda message: self.say(message))  # None: same tokenizer
        distributed.barrier(env)  # every rank has checked --out before rank 0 writes into it
        if env.is_main:
            self.run_dir.open()
            if not self.complete:
                write_json_atomic(self.out / "config.json", cfg.to_dict())

        self.device = resolve_device(cfg.device)
        if env.active and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", env.local_rank)  # one GPU per rank
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        student = setup.checked_student(parts.student or setup.build_student, cfg, self.reader, self.cross)
        self.module = student.to(self.device).train()
        self.model, self.loss_step = setup.build_loss(cfg, self.module, self.cross, env, self.device, self.say)
        self.gap = GapStats(self.domains)
        self.window = Window(self.domains)
        self.opt = setup.build_optimizer(self.module, cfg)
        if self.cross is not None:  # dskd's projectors join the optimiser (own lr) before the schedule wraps it
            self.cross.attach(self.module, self.opt, self.device)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: setup.lr_factor(s, cfg.warmup_steps, cfg.max_steps)
        )
        self.loader = (parts.loader or setup.build_loader)(cfg, self.reader, env, self.device)
        if self.cross is not None:
            self.loader.student_rows = self.cross.batch
        self.draw_rng = np.random.default_rng([cfg.seed, 1])
        self.step, self.tokens_seen = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
        report = dict(report_to=parse_report_to(cfg.report_to), config=cfg.to_dict())
        writes = env.is_main and not self.complete
        self.log = MetricsWriter(self.out, resume_step=ckpt and self.step, **report) if writes else None

    # --- state -------------------------------------------------------------------------------------------
    def _save(self) -> None:
        """Collective under torchrun (the per-domain sums are reduced); rank 0 writes the checkpoint."""
        gap, window = distributed.reduced_copy(self.env, self.gap), distributed.reduced_copy(self.env, self.window)
        if not self.env.is_main:
            return
        guards.check_weights(self.module, self.cfg, self.step, f"the checkpoint of step {self.step}")
        rng = rng_state()
        state = {
            "config": self.cfg.to_dict(),
            "dump_identity": self.reader.manifest.identity(),
            "world": self.env.world,
            "tokens_seen": self.tokens_seen,
            "sampler": self.sampler.state_dict(),
            "gap": gap.state_dict(),
            "window": window.state_dict(),
            "data": self.loader.state_dict(),
            "draw_rng": self.draw_rng.bit_generator.state,
            "rng": rng["json"],
        }
        tensors = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": rng["tensors"]}
        tensors["cross"] = self.cross.state_dict() if self.cross is not None else {}
        save_checkpoint(self.out, self.step, model=self.module, tensors=tensors, state=state)

    def _restore(self, ckpt) -> None:
        ckpt.load_model(self.module)
        if self.cross is not None:
            self.cross.load_state_dict(ckpt.tensors.get("cross", {}))
        self.opt.load_state_dict(ckpt.tensors["optimizer"])
        self.sched.load_state_dict(ckpt.tensors["scheduler"])
        s = ckpt.state
        self.sampler.load_state_dict(s["sampler"])
        self.gap.load_state_dict(s["gap"])
        self.window.load_state_dict(s["window"])
        self.loader.load_state_dict(s["data"])
        self.draw_rng.bit_generator.state = s["draw_rng"]
        set_rng_state(s["rng"], ckpt.tensors["rng"])
        self.step, self.tokens_seen = ckpt.step, int(s["tokens_seen"])
        if self.cfg.extend:  # the saved rate is the old schedule's: put this step on the new length's schedule
            factor = setup.lr_factor(self.step, self.cfg.warmup_steps, self.cfg.max_steps)
            for group, base in zip(self.opt.param_groups, self.sched.base_lrs, strict=True):
                group["lr"] = base * factor
        if not self.env.is_main:  # the saved sums are global: rank 0 carries them, the others start from zero
            self.gap.reset()
            self.window.reset()

    # --- sampling ----------------------------------------------------------------------------------------
    def _update_due(self, step: int) -> bool:
        return self.sampler.should_update(step) or (self.cfg.gap_source == "val" and step == 0)

    def _update_sampler(self, step: int) -> None:
        if self.cfg.gap_source == "val":
            # Every rank evaluates the whole val split (same model, same sums): no reduction needed.
            sums, _ = domain_sums(
                self.module,
                self.reader,
                split="val",
                batch_size=self.cfg.batch_size,
                device=self.device,
                max_sequences=self.cfg.eval_max_sequences,
                data_workers=setup.data_workers(self.cfg),
                cross=self.cross,
            )
            self.gap.load_array(sums[3:6] if self.cross is not None else sums[:3])  # per byte across tokenizers
        else:
            self.gap.load_array(distributed.all_reduce_sum(self.env, self.gap.as_array()))
        self.sampler.update(self.gap, step)
        self.gap.reset()
        guards.warn_if_saturated(self.sampler, self.cfg, step)

    def _plan_step(self) -> None:
        # The global step's draws, identical on every rank; each micro-batch plan is global too (see BatchLoader).
        draws = self.sampler.draw(
            self.cfg.batch_size * self.cfg.grad_accum * self.env.world, self.draw_rng, exact=self.cfg.draw == "quota"
        )
        for micro in np.split(draws, self.cfg.grad_accum):
            self.loader.submit(self.loader.plan(micro))

    def _planned_steps(self) -> int:
        return len(self.loader.pending_plans()) // self.cfg.grad_accum

    # --- loop --------------------------------------------------------------------------------------------
    def train_step(self) -> None:
        cfg, step = self.cfg, self.step
        if self._update_due(step):
            self._update_sampler(step)
        if self._planned_steps() == 0:
            self._plan_step()
        weights = self.sampler.weights  # the mix this step's batch was drawn with
        if step + 1 < cfg.max_steps and not self._update_due(step + 1):
            self._plan_step()  # prefetch: built by the loader thread while this step computes
        t0 = time.perf_counter()
        batches = [self.loader.next() for _ in range(cfg.grad_accum)]
        total = sum(b.labelled for b in batches)
        if self.env.active:
            # DDP averages gradients over ranks: scaling each rank's share by world / global positions makes the
            # result the gradient of the mean over every position of the global step.
            total = float(distributed.all_reduce_sum(self.env, np.array([total]))[0]) / self.env.world
        lr = self.opt.param_groups[0]["lr"]
        self.opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i, b in enumerate(batches):
            n = b.labelled
            b = b.to(self.device, non_blocking=True)
            with distributed.no_sync(self.model, last=i == len(batches) - 1):  # one gradient all-reduce per step
                r = self.loss_step(self.model, b, self.loss_spec, n, total)
            step_loss += r["loss"]
            args = (b.domain, r["row_ce"], r["row_nll"], r["row_n"])
            if cfg.gap_source == "train":
                self.gap.add_rows(*args)
            self.window.stats.add_rows(*args)
            self.window.add(
                loss_sum=r["loss"], ce_sum=r["ce"], kl_sum=r["kl"], positions=r["positions"], tokens=b.input_ids.numel()
            )
            self.tokens_seen += b.input_ids.numel() * self.env.world
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # Before the update: a non-finite step stops the run with the weights of this step untouched.
        guards.check_finite(self.env, self.cfg, step, step_loss, float(norm))
        self.opt.step()
        self.sched.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.window.seconds += time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            distributed.reduce_window(self.env, self.window)  # global sums on every rank (then reset everywhere)
            extra = {
                "grad_norm": float(norm),
                "tokens": self.tokens_seen,
                "gap": {
                    d: (None if math.isnan(g) else float(g))
                    for d, g in zip(self.domains, self.sampler.gaps, strict=True)
                },
            } | (self.cross.log_fields() if self.cross is not None else {})
            if self.log is not None:
                row = self.window.row(step, lr=lr, weights=weights, kd=cfg.kd_weight > 0, extra=extra)
                self.log.write(row)
                self.on_log(row)
            self.window.reset()
        self.step += 1
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps and self.log is not None:
            self.log.write_eval(self.step, self.evaluate().to_dict())  # rank 0 only; the others wait in the next step
        if cfg.save_every and self.step % cfg.save_every == 0:
            self._save()

    def evaluate(self):
        return evaluate_model(
            self.module,
            self.reader,
            name="student",
            batch_size=self.cfg.batch_size,
            device=self.device,
            max_sequences=self.cfg.eval_max_sequences,
            data_workers=setup.data_workers(self.cfg),
            cross=self.cross,
        )

    def run(self, progress=None) -> DistillSummary:
        start, t0 = self.step, time.perf_counter()
        if self.complete:
            self.say(f"the run in {self.out} is complete ({start} of {self.cfg.max_steps} steps); nothing to do")
            done = json.loads((self.out / "summary.json").read_text()) if self.env.is_main else None
            summary = DistillSummary(**done) if done is not None else None
            return distributed.broadcast_object(self.env, summary)
        try:
            while self.step < self.cfg.max_steps:
                self.train_step()
                if progress is not None:
                    progress(self.step, self.cfg.max_steps)
        except BaseException:
            if self.log is not None:
                self.log.close()  # rows so far stay on disk; a --resume continues from the last checkpoint
            raise
        finally:
            self.loader.close()  # the lock on --out stays held until close(): the final save and model follow
        seconds = time.perf_counter() - t0
        if self.cfg.save_every == 0 or self.step % self.cfg.save_every:
            self._save()
        summary = self._finish(seconds, self.tokens_seen, self.step - start) if self.env.is_main else None
        return distributed.broadcast_object(self.env, summary)  # the same summary on every rank

    # --- cleanup -----------------------------------------------------------------------------------------
    def _finish(self, seconds: float, tokens: int, steps_run: int) -> DistillSummary:
        from ddk_offline.distillation.plots import read_metrics, write_plots

        final = self.out / "final"
        guards.check_weights(self.module, self.cfg, self.step, "the final model")
        self.say(f"saving the final model to {final}")
        self.module.save_pretrained(final)
        (self.cross.tokenizer if self.cross is not None else self.reader.tokenizer()).save_pretrained(final)
        has_val = any(self.reader.num_sequences(d, "val") for d in self.domains)
        if has_val:
            self.say("evaluating the final model on the val split")
        result = self.evaluate().to_dict() if has_val else None
        if result is not None:
            self.log.write_eval(self.step, result)
        self.log.close()
        rows = read_metrics(self.log.path)
        plots = [str(p) for p in write_plots(self.log.path, self.out)]
        run_tokens = steps_run * self.cfg.batch_size * self.cfg.grad_accum * self.env.world * self.reader.seq_len
        summary = DistillSummary(
            out=str(self.out),
            final_model=str(final),
            steps=self.step,
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=run_tokens / seconds if seconds > 0 else math.nan,
            final_loss=rows[-1]["loss"] if rows else math.nan,
            weights={d: float(w) for d, w in zip(self.domains, self.sampler.weights, strict=True)},
            eval=result,
            plots=plots,
        )
        (self.out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2, allow_nan=True) + "\n")
        return summary


def distill(
    config: DistillConfig,
    *,
    progress=None,
    parts: RunParts | None = None,
    say: Callable[[str], None] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> DistillSummary:
    """Run phase two end to end (see the module docstring).

    Args:
        config: the run's settings (resolved and saved to ``OUT/config.json``).
        progress: optional callback ``(step, max_steps)`` after each step (the CLI's progress bar).
        parts: components to use instead of the defaults built from ``config`` (see :class:`RunParts`).
        say: called with a status line when a long phase starts (loading, the final save and eval).
        on_log: called with each metrics row (every ``log_every`` steps; the row ``metrics.jsonl`` gets).

    Returns:
        A :class:`DistillSummary`; ``OUT`` holds ``final/`` (model + tokenizer), ``metrics.jsonl``, ``eval.jsonl``,
        ``summary.json``, ``config.json``, PNG plots and ``checkpoints/``.
    """
    env = distributed.setup(resolve_device(config.device).type)  # a no-op without torchrun
    try:
        if say is not None and env.is_main:
            say(f"loading the dump {config.dump} and the student")
        run = Trainer(config, env, parts, say if env.is_main else None)  # a refused run leaves no folder it made
        if env.is_main:
            run.say, run.on_log = say or run.say, on_log or run.on_log
        try:
            summary = run.run(progress)
        finally:
            run.close()
        del run  # its DDP reducer holds the process group: drop it before teardown destroys the group
        return summary
    finally:
        distributed.teardown(env)
