"""Where benchmark rows go: ratios against eager from the same run, the CSV (appended), JSON and a PNG."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
from pathlib import Path

from ddk_offline.bench.providers import PROVIDERS


def environment(device: str) -> dict:
    """Device name and library versions recorded beside every result."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    name = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"
    )
    return dict(
        device=device,
        device_name=name,
        torch=torch.__version__,
        triton=triton_version,
        python=platform.python_version(),
        timestamp=dt.datetime.now(dt.timezone.utc).isoformat(),
    )


def fmt_row(r: dict) -> str:
    if r.get("status") != "ok":
        return f"{r['provider']:>14} {r['mode']:>8} N={r['N']} V={r['V']} k={r['k']}: {r['status']}"
    return (
        f"{r['provider']:>14} {r['mode']:>8} N={r['N']} V={r['V']} k={r['k']}: {r['ms']:9.2f} ms "
        f"{r['peak_mib']:9.1f} MiB {r['gbps']:7.2f} GB/s"
    )


def add_ratios(rows: list[dict]) -> None:
    # Ratios against torch-eager measured in the same run, same shape and mode.
    eager = {
        (r["N"], r["V"], r["k"], r["mode"]): r
        for r in rows
        if r["provider"] == "torch-eager" and r.get("status") == "ok"
    }
    for r in rows:
        e = eager.get((r["N"], r["V"], r["k"], r["mode"]))
        ok = r.get("status") == "ok" and e is not None
        r["speedup_vs_eager"] = e["ms"] / r["ms"] if ok and r["ms"] > 0 else None
        r["mem_ratio_vs_eager"] = r["peak_mib"] / e["peak_mib"] if ok and e["peak_mib"] > 0 else None


COLUMNS = [
    "timestamp",
    "device_name",
    "torch",
    "triton",
    "provider",
    "mode",
    "loss_mode",
    "dtype",
    "N",
    "V",
    "k",
    "ms",
    "peak_mib",
    "gbps",
    "speedup_vs_eager",
    "mem_ratio_vs_eager",
    "status",
]


def write(rows: list[dict], env: dict, out_dir: Path, device: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"kernels_{device}.csv"
    new = not csv_path.exists()
    with csv_path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**env, **r})
    (out_dir / f"kernels_{device}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    _plot(rows, env, out_dir / f"kernels_{device}.png")
    return csv_path


def _plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r["mode"] == "full"]
    if not ok:
        return
    shapes = sorted({(r["N"], r["V"], r["k"]) for r in ok})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        for ax, key in zip(axes, ("ms", "peak_mib"), strict=True):
            vals = [
                next((r[key] for r in ok if r["provider"] == p and (r["N"], r["V"], r["k"]) == s), 0) for s in shapes
            ]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
    for ax, title in zip(axes, ("median time, forward + backward (ms)", "peak extra memory (MiB)"), strict=True):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], [f"N={n}\nV={v}\nk={k}" for n, v, k in shapes])
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"fused KD loss, {env['device_name']}, torch {env['torch']}, {ok[0]['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
