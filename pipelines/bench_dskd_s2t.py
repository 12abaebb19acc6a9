"""DSKD's student-to-teacher KL through the fused-linear loss against the row-chunked path it replaced (issue #19).

    python pipelines/bench_dskd_s2t.py                 # the real pair's shapes, ~3 min on 2 CPU cores
    python pipelines/bench_dskd_s2t.py --rows 64 --vocab 8192 --repeats 1    # seconds

The s2t term is Σ over teacher positions of KL(teacher top-k ‖ softmax(h @ W_tᵀ / T)), h the projected student
states [N, D_t], W_t the teacher head [V_t, D_t] (frozen). Two providers, the same inputs:

- ``chunked``: :class:`ddk_offline.distillation.crosstok.dskd._S2TKL` (still the path of a soft-capped head):
  512 rows of [512, V_t] logits at a time, the gradient taken in the forward (2 matmuls per chunk);
- ``fused-linear``: :func:`ddk_kernels.fused_linear_kd_loss` with alpha = 0, gamma = N / T², what ``dskd`` now runs:
  rows x vocabulary tiles within a 64 MiB budget, the backward recomputing each tile (3 matmuls per tile).

Time: forward + backward, the providers interleaved call by call in one process (machine load hits both alike),
median over repeats; the loss and the gradient of h are checked equal. Memory: each provider once in its own
subprocess, peak RSS (VmHWM) minus the RSS after the inputs exist. Writes ``OUT/dskd_s2t.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "kernels"))

PROVIDERS = ("chunked", "fused-linear")


def inputs(rows: int, dim: int, vocab: int, k: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, dim, generator=g)
    head = torch.randn(vocab, dim, generator=g) / dim**0.5
    top = (torch.randn(rows, k, generator=g) * 3).sort(-1, descending=True).values
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(rows)])
    lse = torch.logsumexp(top, -1) + 2.0  # the teacher's full-row logsumexp: its top-k hold part of the mass
    return h, head, ids, top, lse


def s2t(provider: str, h, head, ids, top, lse, T: float, mode: str):
    """Σ KL and its gradient w.r.t. h, through one provider."""
    import torch
    from ddk_kernels import fused_linear_kd_loss

    from ddk_offline.distillation.crosstok.dskd import _S2TKL, CHUNK_ROWS

    x = h.detach().requires_grad_(True)
    if provider == "chunked":
        loss = _S2TKL.apply(x, ids, top, lse, head, None, None, T, mode, CHUNK_ROWS)
    else:
        labels = torch.zeros(x.shape[0], dtype=torch.long)
        loss = fused_linear_kd_loss(x, head, labels, ids, top, lse, temperature=T, alpha=0.0,
                                    gamma=x.shape[0] / T**2, mode=mode, backend="torch")  # fmt: skip
    loss.backward()
    return float(loss), x.grad


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(provider: str, args) -> None:
    """Run one provider once; print peak RSS above the RSS with the inputs built (MiB)."""
    shapes = inputs(args.rows, args.dim, args.vocab, args.k)
    import torch

    torch.set_num_threads(torch.get_num_threads())
    base = _rss_mib("VmRSS")
    s2t(provider, *shapes, args.temperature, args.mode)
    print(json.dumps({"extra_mib": _rss_mib("VmHWM") - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=458, help="Teacher positions (0.895 x 2 rows x 256: the real check).")
    ap.add_argument("--dim", type=int, default=640)
    ap.add_argument("--vocab", type=int, default=262_144)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=2.0, help="DSKD's reference setting.")
    ap.add_argument("--mode", choices=["tail", "renorm"], default="renorm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--memory-child", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args)
    import torch

    shapes = inputs(args.rows, args.dim, args.vocab, args.k)
    results = {p: {"seconds": []} for p in PROVIDERS}
    outputs = {}
    for _ in range(args.repeats):
        for p in PROVIDERS:
            t0 = time.perf_counter()
            outputs[p] = s2t(p, *shapes, args.temperature, args.mode)
            results[p]["seconds"].append(time.perf_counter() - t0)
    (la, ga), (lb, gb) = outputs["chunked"], outputs["fused-linear"]
    rel_loss = abs(la - lb) / abs(la)
    rel_grad = float((ga - gb).norm() / ga.norm())
    for p in PROVIDERS:
        cmd = [sys.executable, __file__, "--memory-child", p, "--rows", str(args.rows), "--dim", str(args.dim),
               "--vocab", str(args.vocab), "--k", str(args.k), "--temperature", str(args.temperature), "--mode",
               args.mode]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ))
        results[p]["extra_mib"] = json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]
        results[p]["median_s"] = statistics.median(results[p]["seconds"])
    res = {
        "shape": {
            "rows": args.rows,
            "dim": args.dim,
            "vocab": args.vocab,
            "k": args.k,
            "T": args.temperature,
            "mode": args.mode,
            "repeats": args.repeats,
        },  # fmt: skip
        "machine": f"{os.cpu_count()}-core x86_64, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}",
        "providers": results,
        "agreement": {"loss_rel": rel_loss, "grad_h_rel": rel_grad},
    }
    a, b = results["chunked"], results["fused-linear"]
    md = [
        "# DSKD s2t KL: fused-linear vs row-chunked (`pipelines/bench_dskd_s2t.py`)",
        "",
        f"N = {args.rows} teacher positions, D_t = {args.dim}, V_t = {args.vocab:,}, k = {args.k}, T = "
        f"{args.temperature:g}, `{args.mode}`, fp32, forward + backward; {res['machine']}. Time: median of "
        f"{args.repeats}, interleaved; memory: peak RSS above the inputs, each provider in its own process.",
        "",
        "| provider | s (median) | all runs | extra MiB |",
        "|---|---:|---|---:|",
        *[
            f"| {p} | {results[p]['median_s']:.2f} | {', '.join(f'{s:.2f}' for s in results[p]['seconds'])} | "
            f"{results[p]['extra_mib']:.0f} |"
            for p in PROVIDERS
        ],  # fmt: skip
        "",
        f"fused-linear / chunked: time {b['median_s'] / a['median_s']:.2f}x, extra memory "
        f"{b['extra_mib'] / max(a['extra_mib'], 1e-9):.3f}x. Agreement: loss rel {rel_loss:.1e}, grad h rel "
        f"{rel_grad:.1e}.",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dskd_s2t.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / "dskd_s2t.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
