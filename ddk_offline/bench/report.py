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
    shape = f"N={r['N']} V={r['V']} k={r['k']}" + (f" D={r['D']}" if r.get("D") else "")
    if r.get("status") != "ok":
        return f"{r['provider']:>14} {r['mode']:>8} {shape}: {r['status']}"
    line = f"{r['provider']:>14} {r['mode']:>8} {shape}: {r['ms']:9.2f} ms {r['peak_mib']:9.1f} MiB"
    if r.get("extra_mib") is not None:
        return line + f" ({r['extra_mib']:.1f} MiB beyond the input gradients)"
    return line + (f" {r['gbps']:7.2f} GB/s" if r.get("gbps") is not None else "")


def _key(r: dict) -> tuple:
    return r["N"], r["V"], r["k"], r.get("D"), r["mode"]


def add_ratios(rows: list[dict]) -> None:
    # Ratios against torch-eager measured in the same run, same shape and mode.
    # Shapes with D also against the logits path (torch-chunked: logits = hidden @ weight.T, then fused_kd_loss),
    # memory as the loss's own (extra_mib: the peak less the input gradients every provider returns).
    eager = {_key(r): r for r in rows if r["provider"] == "torch-eager" and r.get("status") == "ok"}
    logits = {_key(r): r for r in rows if r["provider"] == "torch-chunked" and r.get("status") == "ok" and r.get("D")}
    for r in rows:
        e = eager.get(_key(r))
        ok = r.get("status") == "ok" and e is not None
        r["speedup_vs_eager"] = e["ms"] / r["ms"] if ok and r["ms"] > 0 else None
        r["mem_ratio_vs_eager"] = r["peak_mib"] / e["peak_mib"] if ok and e["peak_mib"] > 0 else None
        lg = logits.get(_key(r)) if r.get("status") == "ok" else None
        r["time_ratio_vs_logits"] = r["ms"] / lg["ms"] if lg and lg["ms"] else None
        r["extra_ratio_vs_logits"] = r["extra_mib"] / lg["extra_mib"] if lg and lg.get("extra_mib") else None


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
    "D",
    "ms",
    "peak_mib",
    "gbps",
    "speedup_vs_eager",
    "mem_ratio_vs_eager",
    "grads_mib",
    "extra_mib",
    "time_ratio_vs_logits",
    "extra_ratio_vs_logits",
    "status",
]


def write(rows: list[dict], env: dict, out_dir: Path, device: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"kernels_{device}.csv"
    _upgrade_header(csv_path)
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


def _upgrade_header(csv_path: Path) -> None:
    """Rewrite a CSV written with fewer columns under today's header (old rows keep their values, new cells empty)."""
    if not csv_path.exists():
        return
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames == COLUMNS:
            return
        old = list(reader)
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(old)


def _plot(rows: list[dict], env: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and r["mode"] == "full"]
    if not ok:
        return
    shapes = sorted({(r["N"], r["V"], r["k"], r.get("D") or 0) for r in ok})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in ok)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        for ax, key in zip(axes, ("ms", "peak_mib"), strict=True):
            vals = [
                next((r[key] for r in ok if r["provider"] == p and (r["N"], r["V"], r["k"], r.get("D") or 0) == s), 0)
                for s in shapes
            ]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
    for ax, title in zip(axes, ("median time, forward + backward (ms)", "peak extra memory (MiB)"), strict=True):
        ax.set_xticks(
            [j + 0.4 - width / 2 for j in range(len(shapes))],
            [f"N={n}\nV={v}\nk={k}" + (f"\nD={d}" if d else "") for n, v, k, d in shapes],
        )
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"fused KD loss, {env['device_name']}, torch {env['torch']}, {ok[0]['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
