"""``ddk-offline bench-kernels``: the fused KD loss against torch baselines (time, peak memory, achieved GB/s).

- :mod:`.kernels`    :class:`BenchConfig` and :func:`run_benchmarks` (one subprocess per provider and shape on CPU)
- :mod:`.providers`  the providers, shapes and inputs; :mod:`.measure` one measurement; :mod:`.report` CSV/JSON/PNG

Imports only ``ddk_kernels`` (and torch); never the phases.
"""
