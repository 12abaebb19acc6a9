"""`DistillConfig`: every setting of a phase-two run, with its default, in one place.

The CLI builds one from its options (and spells the same defaults out for ``--help``; a test checks they agree).
:meth:`DistillConfig.resolve` fills the derived values from the dump (step count, K, warm-up) and validates
everything that can be checked before a model is loaded; the resolved config is saved as ``OUT/config.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ddk_kernels import KD_MODES

from ddk_offline.distillation.reporters import parse_report_to
from ddk_offline.distillation.samplers import SIGNALS, parse_spec
from ddk_offline.errors import UserError

#: Where the per-domain gaps come from (``--gap-source``) and how a batch's domain mix is drawn (``--draw``).
GAP_SOURCES = ("train", "val")
DRAWS = ("quota", "sample")
#: Fields a resumed run may change; everything else must match the checkpoint or the run would not reproduce.
#: Bounds of options beyond which no run is sane (docs/RELIABILITY.md): the KD temperature, AdamW's learning rate.
TEMPERATURE_RANGE = (0.1, 20.0)
MAX_LR = 1.0
# "dump" and "out" are paths: a resume checks the dump's identity instead (Manifest.identity), so a moved folder or
# another spelling of the same path still resumes, and another dump at the same path does not.
RESUMABLE_CHANGES = frozenset(
    {"resume", "log_every", "save_every", "eval_every", "device", "data_workers", "dump", "out", "report_to"}
    | {"student_tokenizer", "student_rows"}  # paths too: the student rows are keyed by the vocabularies' bytes
    | {"loss_impl"}  # the same loss either way (to floating-point rounding)
)
#: ``--cross-tokenizer`` methods (distillation/crosstok/methods.py registers one class each).
CROSS_METHODS = ("exact-map", "uld", "dskd")
#: ``--loss-impl`` choices (distillation/head.py decides what ``auto`` means for a student).
LOSS_IMPLS = ("auto", "fused-linear", "logits")


@dataclass
class DistillConfig:
    """A distillation run. Defaults follow DDK (Liu et al. 2024): CE + 0.2 * KL at T = 1, smoothing alpha 0.5.

    Attributes:
        dump: the teacher dump directory (phase one's output).
        out: the run's output directory.
        student / student_config / derive_from_teacher: exactly one student source: a checkpoint (folder or .gguf),
            a transformers config JSON (random init), or a derive spec such as ``layers=8,hidden=384`` or
            ``drop=12-19``.
        teacher: the teacher for ``derive_from_teacher`` (default: the dump manifest's ``teacher`` entry).
        sampler: ``ddk``, ``uniform``, ``proportional``, ``fixed:NAME=W,...`` (any name in the sampler registry).
        ddk_interval: K, steps between sampler updates (default ``max(1, max_steps // 20)``: the paper's K = 1000
            was ~1/20-1/50 of its runs, and its ablation shows both much smaller and much larger K hurt).
        ddk_alpha: DDK smoothing; every domain keeps at least (1 - alpha) / N of the data.
        ddk_signal: ``ppl-ratio`` (paper; pretrained or well-derived students) or ``loss-ratio`` (fresh students).
        gap_source: ``train`` (running per-domain CE vs the teacher's stored NLL on the trained positions) or
            ``val`` (evaluate each domain's val shards every K steps, and once before training).
        draw: ``quota`` (exact per-step quotas with carried remainders) or ``sample`` (independent draws).
        ce_weight, kd_weight: alpha and gamma of ``alpha * CE + gamma * T^2 * KL``; ``kd_weight = 0`` skips the KL
            (and the top-k reads): plain continued pre-training on the same data path.
        temperature, kd_mode: KD temperature T and the teacher-target mode (``renorm`` or ``tail``; ``tail`` at
            T != 1 needs the lse at T in the dump).
        max_steps / max_tokens: run length (one of them; tokens, counted over all processes, round up to whole
            steps). Default 1000 steps.
        batch_size, grad_accum: sequences per micro-batch and micro-batches per optimiser step.
        lr, warmup_steps, weight_decay, grad_clip: AdamW with linear warm-up then cosine decay to 10% of ``lr``;
            warm-up defaults to 5% of the steps; ``grad_clip = 0`` disables clipping.
        eval_every: val evaluation every N steps (0: only at the end); eval_max_sequences caps sequences per domain.
        save_every: checkpoint every N steps (default: every 10% of the run; 0: only at the end).
        seed: seeds init, shuffling and draws. device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        resume: continue from ``OUT``'s latest checkpoint.
        log_every: a metrics row every N steps (plus step 0 and the last step).
        extend: with ``resume``, train a run past its ``max_steps`` to the new ``max_steps``/``max_tokens``. The
            learning-rate schedule is recomputed for the new length (warm-up unchanged, cosine decay to 10% of
            ``lr`` at the new last step), so the rate rises again from where the shorter run ended.
        report_to: experiment loggers, comma-separated: ``auto`` (TensorBoard when installed), ``none``,
            ``tensorboard``, ``wandb`` (see :mod:`ddk_offline.distillation.reporters`).
        data_workers: processes that decode the dump's rows for training and evaluation (None: the spare cores,
            see :func:`ddk_offline.format.workers.auto_workers`; 0: a thread of this process). The batches are
            bit-identical for every value, so a resume may change it.
        cross_tokenizer: a student whose tokenizer differs from the dump's: the KD method (``exact-map``, ``uld``,
            ``dskd``; see :mod:`ddk_offline.distillation.crosstok`). None: the student must share the dump's vocabulary.
        student_tokenizer: the student's tokenizer (a folder, hub name or ``.gguf``; default: ``student``'s).
        student_rows: where the student's aligned rows are cached (default: ``<dump>/student_rows`` when the dump
            is a writable local folder, else ``<out>/student_rows``).
        loss_impl: ``fused-linear`` (the loss from the final hidden states and the output head's weight, the [N, V]
            logits never materialised), ``logits`` (the student's logits, then the fused KD loss) or ``auto``
            (fused-linear when the head is a plain linear layer; see :mod:`ddk_offline.distillation.head`).
    """

    dump: str
    out: str
    student: str | None = None
    student_config: str | None = None
    derive_from_teacher: str | None = None
    teacher: str | None = None
    sampler: str = "ddk"
    ddk_interval: int | None = None
    ddk_alpha: float = 0.5
    ddk_signal: str = "ppl-ratio"
    gap_source: str = "train"
    draw: str = "quota"
    ce_weight: float = 1.0
    kd_weight: float = 0.2
    temperature: float = 1.0
    kd_mode: str = "renorm"
    max_steps: int | None = None
    max_tokens: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 0
    eval_max_sequences: int | None = None
    save_every: int | None = None
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    log_every: int = 10
    report_to: str = "auto"
    extend: bool = False
    data_workers: int | None = None
    cross_tokenizer: str | None = None
    student_tokenizer: str | None = None
    student_rows: str | None = None
    loss_impl: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def resolve(self, *, seq_len: int, temperatures: list[float], world: int = 1) -> DistillConfig:
        """Validate and fill the derived defaults. Raises :class:`UserError` naming the option and the fix.

        ``world`` is the number of torchrun processes: ``batch_size`` is per process, so a step trains
        ``batch_size * grad_accum * world * seq_len`` tokens and ``max_tokens`` counts all of them.
        """
        sources = [
            f"--{n}"
            for n, v in (
                ("student", self.student),
                ("student-config", self.student_config),
                ("derive-from-teacher", self.derive_from_teacher),
            )
            if v
        ]
        if len(sources) != 1:
            raise UserError(
                "pass exactly one student source: --student PATH, --student-config JSON or --derive-from-teacher "
                f"SPEC (got {', '.join(sources) if sources else 'none'})"
            )
        try:
            parse_spec(self.sampler)  # the name and the KEY=VALUE syntax; domain weights are checked on the dump
        except ValueError as e:
            raise UserError(f"--sampler {self.sampler}: {e}") from None
        _choice("--ddk-signal", self.ddk_signal, SIGNALS)
        _choice("--gap-source", self.gap_source, GAP_SOURCES)
        _choice("--kd-mode", self.kd_mode, KD_MODES)
        _choice("--draw", self.draw, DRAWS)
        _choice("--loss-impl", self.loss_impl, LOSS_IMPLS)
        if self.cross_tokenizer is not None:
            _choice("--cross-tokenizer", self.cross_tokenizer, CROSS_METHODS)
            if self.derive_from_teacher:
                raise UserError(
                    "--cross-tokenizer with --derive-from-teacher: a derived student has the teacher's "
                    "tokenizer; drop --cross-tokenizer"
                )
            if not (self.student_tokenizer or self.student):
                raise UserError(
                    "--cross-tokenizer with --student-config: pass --student-tokenizer PATH (the "
                    "tokenizer the student reads)"
                )
        elif self.student_tokenizer or self.student_rows:
            raise UserError(
                "--student-tokenizer / --student-rows are for --cross-tokenizer runs; add "
                "--cross-tokenizer METHOD or drop them"
            )
        parse_report_to(self.report_to)  # names, and installed
        if self.data_workers is not None and self.data_workers < 0:
            raise UserError(f"--data-workers must be >= 0 (or left out for automatic), got {self.data_workers}")
        for name, value in (
            ("--batch-size", self.batch_size),
            ("--grad-accum", self.grad_accum),
            ("--log-every", self.log_every),
        ):
            if value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        for name, value in (
            ("--ce-weight", self.ce_weight),
            ("--kd-weight", self.kd_weight),
            ("--weight-decay", self.weight_decay),
            ("--grad-clip", self.grad_clip),
            ("--eval-every", self.eval_every),
        ):
            if not (value >= 0 and math.isfinite(value)):
                raise UserError(f"{name} must be a finite number >= 0, got {value}")
        if self.eval_max_sequences is not None and self.eval_max_sequences < 1:
            # 0 would evaluate nothing: no val numbers, and --gap-source val would never leave the uniform mix.
            raise UserError(f"--eval-max-sequences must be >= 1 (or left out for all), got {self.eval_max_sequences}")
        if self.ce_weight == 0 and self.kd_weight == 0:
            raise UserError("--ce-weight and --kd-weight are both 0: nothing to train; set at least one > 0")
        if not TEMPERATURE_RANGE[0] <= self.temperature <= TEMPERATURE_RANGE[1]:
            raise UserError(
                f"--temperature must be in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}], got "
                f"{self.temperature} (below, exp(logit / T) overflows; above, every teacher distribution is flat)"
            )
        if not 0 < self.lr <= MAX_LR:
            raise UserError(f"--lr must be in (0, {MAX_LR:g}] (an AdamW step moves each weight by ~lr), got {self.lr}")
        if not 0 <= self.ddk_alpha <= 1:
            raise UserError(f"--ddk-alpha must be in [0, 1], got {self.ddk_alpha}")
        dumped = [float(t) for t in temperatures]
        if self.kd_weight > 0 and self.kd_mode == "tail" and float(self.temperature) not in dumped:
            raise UserError(
                f"--kd-mode tail at --temperature {self.temperature:g} needs the teacher's logsumexp at that "
                f"temperature, but the dump {self.dump} stores it only at T = {', '.join(f'{t:g}' for t in dumped)} "
                f"(manifest field 'temperatures'). Fix: use --kd-mode renorm, a dumped temperature, or re-dump with "
                f"--extra-temperatures {self.temperature:g}"
            )
        if self.extend and not self.resume:
            raise UserError("--extend trains an existing run longer: pass it with --resume and the new --max-steps")
        if self.max_steps is not None and self.max_tokens is not None:
            raise UserError("pass --max-steps or --max-tokens, not both")
        steps = self.max_steps
        if self.max_tokens is not None:
            steps = math.ceil(self.max_tokens / (self.batch_size * self.grad_accum * world * seq_len))
        steps = 1000 if steps is None else steps
        if steps < 1:
            raise UserError(f"the run has {steps} steps; --max-steps / --max-tokens must give at least one step")
        interval = self.ddk_interval if self.ddk_interval is not None else max(1, steps // 20)
        if interval < 1:
            raise UserError(f"--ddk-interval must be >= 1, got {interval}")
        warmup = self.warmup_steps if self.warmup_steps is not None else steps // 20
        if not 0 <= warmup <= steps:
            raise UserError(f"--warmup-steps must be in [0, {steps}] (the run's steps), got {warmup}")
        save_every = self.save_every if self.save_every is not None else max(1, steps // 10)
        if save_every < 0:
            raise UserError(f"--save-every must be >= 0, got {save_every}")
        return replace(
            self, max_steps=steps, max_tokens=None, ddk_interval=interval, warmup_steps=warmup, save_every=save_every
        )

    def check_resume(self, saved: dict[str, Any], source: str, step: int = 0) -> None:
        """Refuse a resume whose settings would change the trajectory of the checkpointed run.

        With ``extend``, the run length (``max_steps``; ``max_tokens`` is resolved into it) may grow past ``step``,
        the checkpoint's step: the rest must match.
        """
        mine = self.to_dict()
        allowed = RESUMABLE_CHANGES | ({"max_steps", "max_tokens", "extend"} if self.extend else {"extend"})
        diff = [k for k, v in saved.items() if k in mine and k not in allowed and mine[k] != v]
        if diff:
            pairs = ", ".join(f"{k}: checkpoint {saved[k]!r} vs now {mine[k]!r}" for k in diff)
            more = " (to train a run longer: --extend with the new --max-steps)" if "max_steps" in diff else ""
            raise UserError(
                f"{source}: --resume with different settings ({pairs}); a resumed run must use the settings it "
                f"started with{more}. Fix: pass the original options, or start a new run with another --out"
            )
        if self.extend and self.max_steps <= step:
            raise UserError(
                f"{source}: --extend to {self.max_steps} steps, but the checkpoint is at step {step}; pass a larger "
                "--max-steps (or --max-tokens)"
            )

    def fill_from_checkpoint(self, saved: dict[str, Any]) -> DistillConfig:
        """For ``--extend``: the derived settings left unset (K, warm-up, save interval) keep the run's own values,
        so that only the length changes (they would otherwise be re-derived from the new length)."""
        keep = {k: saved[k] for k in ("ddk_interval", "warmup_steps", "save_every") if getattr(self, k) is None}
        return replace(self, **keep)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
