"""Phase two: train students from a teacher dump, with DDK domain sampling; evaluate them per domain.

Never imports :mod:`ddk_offline.dump`; the two phases meet only in :mod:`ddk_offline.format`.

- :mod:`.config`      :class:`DistillConfig` (every setting and its default, validation, resume compatibility)
- :mod:`.setup`       the run's parts built from the config (student, sampler, loader, optimiser) or handed in
- :mod:`.trainer`     :func:`distill` / :class:`Trainer`: the loop, checkpoints, the final model
- :mod:`.loss`        one micro-batch: forward, CE + KL through ``ddk_kernels``, backward
- :mod:`.samplers`    DDK and the baseline samplers (a registry); :mod:`.data` streams and batches over the shards
- :mod:`.student`     checkpoint / config / derived students, the vocabulary and context checks
- :mod:`.evaluation`  per-domain validation loss against the teacher's stored loss
- :mod:`.checkpoint`, :mod:`.runlog`, :mod:`.plots`  atomic checkpoints, metrics.jsonl, PNG plots
"""

from __future__ import annotations

from ddk_offline.distillation.config import DistillConfig
from ddk_offline.distillation.setup import RunParts
from ddk_offline.distillation.trainer import DistillSummary, Trainer, distill

__all__ = ["DistillConfig", "DistillSummary", "RunParts", "Trainer", "distill"]
