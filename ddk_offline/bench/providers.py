"""The benchmark's providers: each name maps to a loss callable with one signature, plus the shared inputs.

Adding a provider: one entry in :data:`PROVIDERS` and one branch in :func:`loss_fn` (and a reason in
:func:`skip_reason` if it cannot run everywhere).
"""

from __future__ import annotations

# torch-chunked-inplace: the same with inplace_grad=True (the trainer's case: lm_head's output dies with the loss).
# fused-linear: fused_linear_kd_loss from hidden states and the head (shapes with D only: the "linear" sets, where
# every other provider computes logits = hidden @ weight.T first and all take gradients of hidden and weight).
PROVIDERS = ("triton-fused", "torch-chunked", "torch-chunked-inplace", "torch-eager", "torch-compile", "liger",
             "fused-linear")  # fmt: skip
MODES = ("forward", "backward", "full")
GPU_SHAPES = {
    "quick": [(4096, 32000, 64), (4096, 151936, 64)],
    "full": [(n, v, k) for n in (4096, 16384) for v in (32000, 49152, 128256, 151936) for k in (16, 64, 128)],
    "linear": [(8192, 151936, 64, 1536), (8192, 262144, 64, 640)],  # (N, V, k, D)
}
CPU_SHAPES = {
    "quick": [(1024, 32000, 64), (4096, 49152, 64)],
    "full": [(1024, 32000, 64), (4096, 49152, 16), (4096, 49152, 64), (4096, 49152, 128), (1024, 151936, 64)],
    "linear": [(4096, 49152, 64, 576), (2048, 262144, 64, 640)],  # (N, V, k, D): SmolLM2-135M's and Gemma-3's heads
}


def make_inputs(N: int, V: int, k: int, dtype: str, device: str, temperature: float = 1.0, seed: int = 0):
    """Student logits [N, V] (dtype) and a consistent top-k teacher; labels have ~5% ignored rows."""
    import torch

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(N, V, device=device, generator=g, dtype=torch.float32).mul_(3.0).to(tdt)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    labels[torch.rand(N, device=device, generator=g) < 0.05] = -100
    topk_ids = torch.randint(0, V, (N, k), device=device, generator=g)
    topk_logits = torch.randn(N, k, device=device, generator=g).mul_(3.0).sort(dim=1, descending=True).values
    teacher_lse = torch.logsumexp(topk_logits / temperature, dim=1) + 0.5  # some mass outside the top-k
    return logits, labels, topk_ids, topk_logits, teacher_lse


def make_leaves(shape: tuple, dtype: str, device: str):
    """``(leaves, args)``: the differentiable inputs (logits, or hidden [N, D] and weight [V, D] for a shape with D)
    and (labels, ids, tlog, tlse)."""
    import torch

    N, V, k = shape[:3]
    logits, *args = make_inputs(N, V, k, dtype, device)
    if len(shape) == 3:
        return (logits.requires_grad_(True),), tuple(args)
    del logits
    D = shape[3]
    g = torch.Generator(device=device).manual_seed(1)
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    hidden = torch.randn(N, D, device=device, generator=g).to(tdt)
    weight = torch.randn(V, D, device=device, generator=g).mul_(3.0 / D**0.5).to(tdt)  # logits of std ~3, as above
    return (hidden.requires_grad_(True), weight.requires_grad_(True)), tuple(args)


def loss_fn(provider: str, loss_mode: str, linear: bool = False):
    """Returns f(*leaves, labels, ids, tlog, tlse) -> scalar loss (leaves: logits, or hidden and weight when
    ``linear``), or raises RuntimeError('skip: why')."""
    kw = dict(temperature=1.0, alpha=1.0, gamma=1.0, mode=loss_mode)
    if provider == "fused-linear":
        from ddk_kernels import fused_linear_kd_loss

        return lambda h, w, y, i, t, s: fused_linear_kd_loss(h, w, y, i, t, s, **kw)
    if linear:
        base = loss_fn(provider, loss_mode)
        return lambda h, w, y, i, t, s: base(h @ w.T, y, i, t, s)
    return _logits_loss_fn(provider, kw)


def _logits_loss_fn(provider: str, kw: dict):
    import torch

    if provider in ("triton-fused", "torch-chunked", "torch-chunked-inplace"):
        from ddk_kernels import fused_kd_loss

        backend = "triton" if provider == "triton-fused" else "torch"
        inplace = provider == "torch-chunked-inplace"
        # In place, the first backward leaves the gradient in the logits buffer and later repetitions run on
        # those values: the work per call does not depend on the data, so the timing is unaffected.
        return lambda x, y, i, t, s: fused_kd_loss(x, y, i, t, s, backend=backend, inplace_grad=inplace, **kw)
    from ddk_kernels.reference import eager_kd_loss

    eager = lambda x, y, i, t, s: eager_kd_loss(x, y, i, t, s, **kw)[0]
    if provider == "torch-eager":
        return eager
    if provider == "torch-compile":
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False  # the backward mode re-runs backward(retain_graph=True)
        return torch.compile(eager, dynamic=False)
    if provider == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss  # optional dependency

        ce = LigerCrossEntropyLoss(ignore_index=-100)
        return lambda x, y, i, t, s: ce(x, y)
    raise ValueError(f"bench-kernels: unknown provider {provider!r}; use one of {PROVIDERS}")


def skip_reason(provider: str, device: str, shape: tuple = ()) -> str | None:
    import importlib.util

    if provider == "fused-linear" and len(shape) != 4:
        return "skipped: needs shapes with D (--shapes linear)"

    if provider == "triton-fused" and device != "cuda":
        return "skipped: needs a GPU (the CPU interpreter's timings mean nothing)"
    if provider == "liger":
        if device != "cuda":
            return "skipped: Liger-Kernel runs on GPU only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "skipped: liger-kernel is not installed"
    return None
