#!/usr/bin/env bash
# A real full disk (not an injected OSError): dump into a 96 KiB tmpfs, watch it fail cleanly, grow the tmpfs,
# rerun the same command, and compare every shard's sha256 with an uninterrupted dump.
# Needs root (mount). Tiny random-init teacher from tests/tiny.py; about 30 s on 2 CPU cores, < 1 MB of disk.
set -euo pipefail
cd "$(dirname "$0")/.."
W=$(mktemp -d)
trap 'umount "$W/mnt" 2>/dev/null || true; rm -rf "$W"' EXIT

# --- inputs: tiny teacher + 3-domain corpus -----------------------------------------------------------------------
python -c "import sys; sys.path[:0] = ['tests']; import tiny; from pathlib import Path
tiny.save_teacher(Path('$W/teacher')); tiny.write_jsonl(tiny.make_corpus(30), Path('$W/corpus.jsonl'))" 2>/dev/null
ARGS=(--teacher "$W/teacher" --data "$W/corpus.jsonl" --seq-len 32 --top-k 8 --batch-size 2 --val-fraction 0.2
      --max-tokens-per-domain 320 --shard-tokens 96 -q)

# --- reference: an uninterrupted dump (12 shards, ~160 KB with the tokenizer) --------------------------------------
python -m ddk_offline dump-teacher "${ARGS[@]}" --out "$W/ref"

# --- the disk fills up mid-dump: exit status 2, one red line, complete shards kept, nothing partial ---------------
mkdir "$W/mnt" && mount -t tmpfs -o size=96k tmpfs "$W/mnt"
if python -m ddk_offline dump-teacher "${ARGS[@]}" --out "$W/mnt/dump"; then echo "expected a full disk"; exit 1; fi
ls -A "$W/mnt/dump/.tmp" | wc -l | xargs echo "files left in .tmp:"
python -m ddk_offline dumps verify "$W/mnt/dump" || true   # lists the unfinished streams, no broken shard

# --- space is back: the same command resumes; the result equals the uninterrupted dump -----------------------------
mount -o remount,size=4m "$W/mnt"
python -m ddk_offline dump-teacher "${ARGS[@]}" --out "$W/mnt/dump"
python -m ddk_offline dumps verify "$W/mnt/dump"
python - "$W/ref" "$W/mnt/dump" <<'PY'
import json, sys
shas = lambda p: {d: {s: [x["sha256"] for x in v["splits"][s]["shards"]] for s in v["splits"]}
                  for d, v in json.load(open(f"{p}/manifest.json"))["domains"].items()}
assert shas(sys.argv[1]) == shas(sys.argv[2]), "resumed dump differs"
print("resumed dump == uninterrupted dump (every shard sha256)")
PY
