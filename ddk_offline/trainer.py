"""Phase two: distil a student from a teacher dump, with DDK domain sampling. ``distill(config) -> summary``.

Reads top to bottom: setup (dump, student, sampler, optimiser, data) -> loss step -> loop -> cleanup.

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

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddk_offline import distributed
from ddk_offline.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ddk_offline.data import IGNORE_INDEX, Batch, BatchLoader
from ddk_offline.distill_config import DistillConfig
from ddk_offline.errors import UserError
from ddk_offline.evaluation import domain_sums, evaluate_model, resolve_device
from ddk_offline.format.manifest import write_json_atomic
from ddk_offline.format.reader import DumpReader, open_dump
from ddk_offline.runlog import MetricsWriter, Window
from ddk_offline.sampler import GapStats, make_sampler

__all__ = ["DistillConfig", "DistillSummary", "distill"]


@dataclass
class DistillSummary:
    """What a finished run reports (also written to ``OUT/summary.json``)."""

    out: str
    final_model: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float
    weights: dict[str, float]
    eval: dict[str, Any] | None = None
    plots: list[str] = field(default_factory=list)


# --- setup ------------------------------------------------------------------------------------------------
def build_student(cfg: DistillConfig, reader: DumpReader) -> torch.nn.Module:
    """The student from exactly one source, refused if its vocabulary or context does not fit the dump."""
    from ddk_offline.student import VocabMismatchError, check_vocab, load_student

    teacher = None
    if cfg.derive_from_teacher:
        teacher = cfg.teacher or _manifest_teacher(reader)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = load_student(
                pretrained=cfg.student, config=cfg.student_config, derive=cfg.derive_from_teacher, teacher=teacher,
                seed=cfg.seed,
            )  # fmt: skip
    except (OSError, ValueError) as e:
        raise UserError(f"cannot build the student: {e}") from None
    manifest = reader.manifest
    try:
        check_vocab(model, int(manifest.tokenizer.get("tokens", manifest.vocab_size)), reader.path, manifest.vocab_size)
    except VocabMismatchError as e:
        raise UserError(str(e)) from None
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos < reader.seq_len:
        raise UserError(
            f"the student's max_position_embeddings is {max_pos} but the dump's sequences have {reader.seq_len} "
            "tokens; use a student config with max_position_embeddings >= seq_len"
        )
    return model.float()


def _manifest_teacher(reader: DumpReader) -> str:
    t = reader.manifest.teacher
    name = str(t.get("name", ""))
    path = Path(name)
    if t.get("gguf_file") and path.is_dir():
        path = path / t["gguf_file"]
    if not path.exists():
        raise UserError(
            f"{reader.store.where('manifest.json')}: field 'teacher.name' = {name!r} is not a path on this machine; "
            "pass --teacher PATH (the teacher the dump was made with) to derive the student"
        )
    return str(path)


def _optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    # No weight decay on biases, norms and other vectors (standard for transformers).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay from 1 to ``floor`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


# --- loss step --------------------------------------------------------------------------------------------
def loss_step(model: torch.nn.Module, batch: Batch, cfg: DistillConfig, positions: int, total: int) -> dict[str, Any]:
    """Forward + backward of one micro-batch holding ``positions`` labelled positions of the step's ``total``.

    The micro-batch loss (a mean over its positions) is scaled by ``positions / total``, so the accumulated gradient
    is that of the mean over every position of the step, however the positions are split into micro-batches.

    Returns:
        Sums over the micro-batch's labelled positions (``loss``, ``ce``, ``kl``) and per-sequence CE / teacher NLL
        sums and counts ([B] each, same positions) for the per-domain statistics.
    """
    device = batch.input_ids.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        logits = model(input_ids=batch.input_ids).logits
    B, L, V = logits.shape
    flat, labels = logits.reshape(B * L, V), batch.labels.reshape(-1)
    mask = batch.labels != IGNORE_INDEX
    n = positions  # counted on the host: no device sync here
    if cfg.kd_weight > 0:
        from ddk_kernels import fused_kd_loss

        k = batch.topk_ids.shape[-1]
        loss, ce, kl = fused_kd_loss(
            flat, labels, batch.topk_ids.reshape(-1, k), batch.topk_logits.reshape(-1, k),
            batch.teacher_lse.reshape(-1), temperature=cfg.temperature, alpha=cfg.ce_weight, gamma=cfg.kd_weight,
            mode=cfg.kd_mode, ignore_index=IGNORE_INDEX, return_per_row=True,
        )  # fmt: skip
        kl_sum = float(kl.sum())
    else:
        # CE only (continued pre-training): no top-k tensors, no KL pass.
        ce = F.cross_entropy(flat.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
        loss = cfg.ce_weight * ce.sum() / max(n, 1)
        kl_sum = 0.0
    (loss * (n / max(total, 1))).backward()
    ce = ce.detach().float().reshape(B, L)
    return {
        "loss": float(loss.detach()) * n,
        "ce": float(ce.sum()),
        "kl": kl_sum,
        "positions": n,
        "row_ce": (ce * mask).sum(1),
        "row_nll": batch.teacher_nll.double().sum(1),
        "row_n": mask.sum(1),
    }


# --- the run ----------------------------------------------------------------------------------------------
class _Run:
    """The mutable state of one run (setup in __init__, the loop in ``run``)."""

    def __init__(self, config: DistillConfig, env: distributed.DistEnv | None = None):
        self.env = env = env or distributed.DistEnv()
        self.reader = open_dump(config.dump)
        m = self.reader.manifest
        cfg = config.resolve(seq_len=m.seq_len, temperatures=list(m.temperatures), world=env.world)
        self.out = Path(cfg.out)
        ckpt = None
        if cfg.resume:
            path = latest_checkpoint(self.out)
            if path is None:
                raise UserError(f"--resume: no checkpoint in {self.out / 'checkpoints'}; start without --resume")
            ckpt = load_checkpoint(path)
            cfg.check_resume(ckpt.state["config"], str(path))
            saved_world = int(ckpt.state.get("world", 1))
            if saved_world != env.world:
                raise UserError(
                    f"{path}: the run was checkpointed with {saved_world} process(es), this resume has {env.world}; "
                    f"the global batch (--batch-size x --grad-accum x processes) would change. Resume with "
                    f"{saved_world} process(es)"
                )
        elif (self.out / "checkpoints").exists() or (self.out / "metrics.jsonl").exists():
            raise UserError(f"--out {self.out}: holds an earlier run; pass --resume to continue it, or another --out")
        self.cfg, self.domains = cfg, self.reader.domains
        empty = [d for d in self.domains if self.reader.num_sequences(d, "train") == 0]
        if empty and not cfg.sampler.startswith("fixed"):
            raise UserError(f"{cfg.dump}: domains {empty} have no train sequences; re-dump, or use --sampler fixed:")
        if cfg.gap_source == "val" and not all(self.reader.num_sequences(d, "val") for d in self.domains):
            raise UserError(f"--gap-source val: {cfg.dump} lacks val sequences for some domain; use --gap-source train")
        distributed.barrier(env)  # every rank has checked --out before rank 0 writes into it
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.out / "config.json", cfg.to_dict())

        self.device = resolve_device(cfg.device)
        if env.active and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", env.local_rank)  # one GPU per rank
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.module = build_student(cfg, self.reader).to(self.device).train()
        self.model = distributed.wrap_ddp(self.module, env, self.device)  # the module itself for one process
        tokens = {d: float(self.reader.manifest.domains[d].splits["train"].tokens) for d in self.domains}
        try:
            self.sampler = make_sampler(cfg.sampler, self.domains, train_tokens=tokens, alpha=cfg.ddk_alpha,
                                        signal=cfg.ddk_signal, update_every=cfg.ddk_interval)  # fmt: skip
        except ValueError as e:
            raise UserError(f"--sampler {cfg.sampler}: {e}") from None
        self.gap = GapStats(self.domains)
        self.window = Window(self.domains)
        self.opt = _optimizer(self.module, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps)
        )
        self.loader = BatchLoader(self.reader, seed=cfg.seed, temperature=cfg.temperature,
                                  with_topk=cfg.kd_weight > 0, pin_memory=self.device.type == "cuda",
                                  part=(env.rank, env.world))  # fmt: skip
        self.draw_rng = np.random.default_rng([cfg.seed, 1])
        self.step, self.tokens_seen = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
        self.log = MetricsWriter(self.out, resume_step=self.step if ckpt is not None else None) if env.is_main else None

    # --- state -------------------------------------------------------------------------------------------
    def _save(self) -> None:
        """Collective under torchrun (the per-domain sums are reduced); rank 0 writes the checkpoint."""
        gap, window = distributed.reduced_copy(self.env, self.gap), distributed.reduced_copy(self.env, self.window)
        if not self.env.is_main:
            return
        rng = rng_state()
        state = {
            "config": self.cfg.to_dict(),
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
        save_checkpoint(self.out, self.step, model=self.module, tensors=tensors, state=state)

    def _restore(self, ckpt) -> None:
        ckpt.load_model(self.module)
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
        if not self.env.is_main:  # the saved sums are global: rank 0 carries them, the others start from zero
            self.gap.reset()
            self.window.reset()

    # --- sampling ----------------------------------------------------------------------------------------
    def _update_due(self, step: int) -> bool:
        return self.sampler.should_update(step) or (self.cfg.gap_source == "val" and step == 0)

    def _update_sampler(self, step: int) -> None:
        if self.cfg.gap_source == "val":
            # Every rank evaluates the whole val split (same model, same sums): no reduction needed.
            sums, _ = domain_sums(self.module, self.reader, split="val", batch_size=self.cfg.batch_size,
                                  device=self.device, max_sequences=self.cfg.eval_max_sequences)  # fmt: skip
            self.gap.load_array(sums)
        else:
            self.gap.load_array(distributed.all_reduce_sum(self.env, self.gap.as_array()))
        self.sampler.update(self.gap, step)
        self.gap.reset()

    def _plan_step(self) -> None:
        # The global step's draws, identical on every rank; each micro-batch plan is global too (see BatchLoader).
        draws = self.sampler.draw(self.cfg.batch_size * self.cfg.grad_accum * self.env.world, self.draw_rng,
                                  exact=self.cfg.draw == "quota")  # fmt: skip
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
        for i, b in enumerate(batches):
            n = b.labelled
            b = b.to(self.device, non_blocking=True)
            with distributed.no_sync(self.model, last=i == len(batches) - 1):  # one gradient all-reduce per step
                r = loss_step(self.model, b, cfg, n, total)
            args = (b.domain, r["row_ce"], r["row_nll"], r["row_n"])
            if cfg.gap_source == "train":
                self.gap.add_rows(*args)
            self.window.stats.add_rows(*args)
            self.window.add(loss_sum=r["loss"], ce_sum=r["ce"], kl_sum=r["kl"], positions=r["positions"],
                            tokens=b.input_ids.numel())  # fmt: skip
            self.tokens_seen += b.input_ids.numel() * self.env.world
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.opt.step()
        self.sched.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.window.seconds += time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.max_steps - 1:
            distributed.reduce_window(self.env, self.window)  # global sums on every rank (then reset everywhere)
            extra = {"grad_norm": float(norm), "tokens": self.tokens_seen,
                     "gap": {d: (None if math.isnan(g) else float(g)) for d, g in zip(self.domains, self.sampler.gaps,
                                                                                      strict=True)}}  # fmt: skip
            if self.log is not None:
                self.log.write(self.window.row(step, lr=lr, weights=weights, kd=cfg.kd_weight > 0, extra=extra))
            self.window.reset()
        self.step += 1
        if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps and self.log is not None:
            self.log.write_eval(self.step, self.evaluate().to_dict())  # rank 0 only; the others wait in the next step
        if cfg.save_every and self.step % cfg.save_every == 0:
            self._save()

    def evaluate(self):
        return evaluate_model(self.module, self.reader, name="student", batch_size=self.cfg.batch_size,
                              device=self.device, max_sequences=self.cfg.eval_max_sequences)  # fmt: skip

    def run(self, progress=None) -> DistillSummary:
        start, t0 = self.step, time.perf_counter()
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
            self.loader.close()
        seconds = time.perf_counter() - t0
        if self.cfg.save_every == 0 or self.step % self.cfg.save_every:
            self._save()
        summary = self._finish(seconds, self.tokens_seen, self.step - start) if self.env.is_main else None
        return distributed.broadcast_object(self.env, summary)  # the same summary on every rank

    # --- cleanup -----------------------------------------------------------------------------------------
    def _finish(self, seconds: float, tokens: int, steps_run: int) -> DistillSummary:
        from ddk_offline.plots import read_metrics, write_plots

        final = self.out / "final"
        self.module.save_pretrained(final)
        self.reader.tokenizer().save_pretrained(final)
        has_val = any(self.reader.num_sequences(d, "val") for d in self.domains)
        result = self.evaluate().to_dict() if has_val else None
        if result is not None:
            self.log.write_eval(self.step, result)
        self.log.close()
        rows = read_metrics(self.log.path)
        plots = [str(p) for p in write_plots(self.log.path, self.out)]
        run_tokens = steps_run * self.cfg.batch_size * self.cfg.grad_accum * self.env.world * self.reader.seq_len
        summary = DistillSummary(
            out=str(self.out), final_model=str(final), steps=self.step, tokens=tokens, seconds=seconds,
            tokens_per_s=run_tokens / seconds if seconds > 0 else math.nan,
            final_loss=rows[-1]["loss"] if rows else math.nan,
            weights={d: float(w) for d, w in zip(self.domains, self.sampler.weights, strict=True)},
            eval=result, plots=plots,
        )  # fmt: skip
        (self.out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2, allow_nan=True) + "\n")
        return summary


def distill(config: DistillConfig, *, progress=None) -> DistillSummary:
    """Run phase two end to end (see the module docstring).

    Args:
        config: the run's settings (resolved and saved to ``OUT/config.json``).
        progress: optional callback ``(step, max_steps)`` after each step (the CLI's progress bar).

    Returns:
        A :class:`DistillSummary`; ``OUT`` holds ``final/`` (model + tokenizer), ``metrics.jsonl``, ``eval.jsonl``,
        ``summary.json``, ``config.json``, PNG plots and ``checkpoints/``.
    """
    env = distributed.setup(resolve_device(config.device).type)  # a no-op without torchrun
    try:
        out = Path(config.out)
        fresh = not out.exists()
        try:
            run = _Run(config, env)
        except BaseException:
            if fresh and env.is_main:  # a refused run (bad student, bad options) leaves no half-made output folder
                shutil.rmtree(out, ignore_errors=True)
            raise
        summary = run.run(progress)
        del run  # its DDP reducer holds the process group: drop it before teardown destroys the group
        return summary
    finally:
        distributed.teardown(env)
