"""The parts of a distillation run, each built from the resolved config (torchtune's ``_setup_*`` shape).

:class:`RunParts` lets a caller hand in any of them instead (benchmarks feed batches from memory, tests stop a run
mid-way, integrations bring their own student): nothing has to patch the trainer's private names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.data import BatchLoader
from ddk_offline.distillation.samplers import DomainSampler, make_sampler
from ddk_offline.errors import UserError
from ddk_offline.format.reader import DumpReader
from ddk_offline.format.workers import auto_workers
from ddk_offline.runtime.distributed import DistEnv, wrap_ddp

StudentFactory = Callable[[DistillConfig, DumpReader], torch.nn.Module]
SamplerFactory = Callable[[DistillConfig, DumpReader], DomainSampler]
LoaderFactory = Callable[[DistillConfig, DumpReader, DistEnv, torch.device], BatchLoader]


@dataclass
class RunParts:
    """Factories for the parts of a run; None means the default built from the config.

    Attributes:
        student: ``(config, reader) -> model`` (default :func:`build_student`); its vocabulary is checked anyway.
        sampler: ``(config, reader) -> DomainSampler`` (default :func:`build_sampler`).
        loader: ``(config, reader, env, device) -> loader`` with :class:`~ddk_offline.distillation.data.BatchLoader`'s
            ``plan / submit / next / pending_plans / state_dict / load_state_dict / close`` (default
            :func:`build_loader`).
    """

    student: StudentFactory | None = None
    sampler: SamplerFactory | None = None
    loader: LoaderFactory | None = None


def build_student(cfg: DistillConfig, reader: DumpReader) -> torch.nn.Module:
    """The student from exactly one source (checkpoint, config or derive spec), seeded with ``cfg.seed``."""
    from ddk_offline.distillation.student import load_student

    teacher = None
    if cfg.derive_from_teacher:
        teacher = cfg.teacher or reader.manifest.local_teacher()
        if teacher is None:
            raise UserError(
                f"{reader.store.where('manifest.json')}: field 'teacher.name' = {reader.manifest.teacher_name!r} is "
                "not a path on this machine; pass --teacher PATH (the teacher the dump was made with) to derive the "
                "student"
            )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return load_student(
                pretrained=cfg.student,
                config=cfg.student_config,
                derive=cfg.derive_from_teacher,
                teacher=teacher,
                seed=cfg.seed,
            )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot build the student: {e}") from None


def check_dump(cfg: DistillConfig, reader: DumpReader) -> None:
    """Refuse a dump the run's sampler or gap source cannot use."""
    empty = [d for d in reader.domains if reader.num_sequences(d, "train") == 0]
    if empty and not cfg.sampler.startswith("fixed"):
        raise UserError(f"{cfg.dump}: domains {empty} have no train sequences; re-dump, or use --sampler fixed:")
    if cfg.gap_source == "val" and not all(reader.num_sequences(d, "val") for d in reader.domains):
        raise UserError(f"--gap-source val: {cfg.dump} lacks val sequences for some domain; use --gap-source train")


def build_cross(cfg: DistillConfig, reader: DumpReader, say: Callable[[str], None]) -> Any:
    """A cross-tokenizer run's :class:`~ddk_offline.distillation.crosstok.session.CrossTokenizer` (None otherwise):
    the student's tokenizer loaded and the dump's rows aligned with it (cached)."""
    if cfg.cross_tokenizer is None:
        return None
    from ddk_offline.distillation.crosstok.session import CrossTokenizer, load_tokenizer

    tokenizer = load_tokenizer(cfg.student_tokenizer or cfg.student)
    return CrossTokenizer(
        reader, tokenizer, method=cfg.cross_tokenizer, cache_root=cfg.student_rows, out=cfg.out, say=say
    )


def checked_student(
    factory: StudentFactory, cfg: DistillConfig, reader: DumpReader, cross: Any = None
) -> torch.nn.Module:
    """The student from ``factory``, refused if its vocabulary or context does not fit the dump (with ``cross``: the
    student rows); fp32 weights."""
    from ddk_offline.distillation.student import StudentMismatchError, check_fits

    model = factory(cfg, reader)
    if cross is not None:
        cross.check_student(model)  # raises UserError itself
        return _fp32(model)
    try:
        check_fits(model, reader.manifest, reader.path)
    except StudentMismatchError as e:
        raise UserError(str(e)) from None
    return _fp32(model)


def build_loss(
    cfg: DistillConfig, module: torch.nn.Module, cross: Any, env: DistEnv, device: torch.device, say: Callable
) -> tuple[torch.nn.Module, Callable]:
    """``(model, step)`` for ``--loss-impl``: the loss step calls ``step(model, batch, spec, positions, total)``.

    ``model`` is the student, or :class:`~ddk_offline.distillation.loss.FusedLinearLoss` around it, in
    DistributedDataParallel when there are several ranks (the module itself for one process).
    """
    from ddk_offline.distillation.head import choose_loss_impl
    from ddk_offline.distillation.loss import FusedLinearLoss, fused_linear_step, loss_step

    found = choose_loss_impl(cfg.loss_impl, module, cross=cross is not None, say=say)
    if found is None:
        return wrap_ddp(module, env, device), (cross.loss_step if cross is not None else loss_step)
    return wrap_ddp(FusedLinearLoss(module, *found), env, device), fused_linear_step


def _fp32(model: torch.nn.Module) -> torch.nn.Module:
    """fp32 weights. Not ``model.float()``: transformers refuses it for a model loaded from a GGUF (it counts as
    quantised, though its weights are dequantised), so the tensors are converted in place."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor.data = tensor.data.float()
    return model


def build_sampler(cfg: DistillConfig, reader: DumpReader) -> DomainSampler:
    """The domain sampler of ``cfg.sampler``, its weights checked against the dump's domains."""
    tokens = {d: float(reader.manifest.domains[d].splits["train"].tokens) for d in reader.domains}
    try:
        return make_sampler(
            cfg.sampler,
            reader.domains,
            train_tokens=tokens,
            alpha=cfg.ddk_alpha,
            signal=cfg.ddk_signal,
            update_every=cfg.ddk_interval,
        )
    except ValueError as e:
        raise UserError(f"--sampler {cfg.sampler}: {e}") from None


def data_workers(cfg: DistillConfig) -> int:
    """The run's decoding processes: ``--data-workers``, or the spare cores of this rank."""
    return auto_workers() if cfg.data_workers is None else cfg.data_workers


def build_loader(cfg: DistillConfig, reader: DumpReader, env: DistEnv, device: torch.device) -> BatchLoader:
    """Per-domain shuffled streams over the train shards, this rank's rows of every global plan."""
    return BatchLoader(
        reader,
        seed=cfg.seed,
        temperature=cfg.temperature,
        with_topk=cfg.kd_weight > 0,
        pin_memory=device.type == "cuda",
        part=(env.rank, env.world),
        workers=data_workers(cfg),
    )


def build_optimizer(model: torch.nn.Module, cfg: DistillConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and other vectors (standard for transformers)."""
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
