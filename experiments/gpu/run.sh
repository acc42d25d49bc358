#!/usr/bin/env bash
# The efficiency numbers of issue 16 on one lent GPU (written for an NVIDIA H200), in ~10 minutes.
#
#   bash experiments/gpu/run.sh [OUT_DIR] [COMPARE_DIR]
#
#   OUT_DIR      where the CSVs (and plots) go; default experiments/results
#   COMPARE_DIR  a `vtr compare --out` folder (<method>/checkpoints/best.ckpt); step (c) is
#                skipped without it. Its recallers/re-rankers: $FRONTIER_RECALLERS, $FRONTIER_RERANKERS
#                (default: every fusion-free / text-conditioned method found in it).
#
# Runs from the repository root without installing it (PYTHONPATH=$PWD python -m retrieval.cli),
# with no network: the recipes are built with random weights (--pretrained none / pretrained None).
# Steps, each under its own `timeout`; a failed or timed-out step is reported and the next runs
# (every tool writes its CSV after each method, so a timeout keeps what was measured):
#   (a) vtr bench latency  fp16, cuda, every experiments/model recipe at ViT-B/32 shapes,
#       galleries 1k/10k/100k/1M, batch 1 and 64                                    (<= 200 s)
#   (b) vtr bench gallery  1M x 512, fp32/bf16/fp16/int8 stores, batch 1 and 64, the exact search's
#       torch and Triton kernels side by side (retrieval.topk)                    (<= 120 s)
#   (c) vtr bench frontier on COMPARE_DIR, galleries 10k/100k                      (<= 60 s)
#   (d) vtr bench train    clips/s and MFU of a ViT-B/32 bf16 training step per method,
#       batch 32, the recipe's frames (12; prompt_switch 6), MFU against 989 TFLOP/s (<= 120 s)
#   (e) vtr bench latency --rerank-k: the four two-stage pairs of experiments/two_stage at
#       ViT-B/32 shapes, fp16, k 10/50/200, galleries 10k/100k/1M, batch 1, with the two
#       recallers and two re-rankers alone as the ends (latency-two-stage_*.csv)     (<= 150 s)
#
# VTR_GPU_STEPS="b c": run only those steps (default: a b c d e).
# VTR_GPU_DRY_RUN=1: the same steps on the CPU at toy sizes (vtr-micro, 1k galleries, meanpool
# and xclip only) to check the script itself.
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-experiments/results}
COMPARE=${2:-}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export VTR_CACHE=${VTR_CACHE:-$(mktemp -d)}
PY=${PYTHON:-python}
mkdir -p "$OUT"

if [ "${VTR_GPU_DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu; GALLERIES="1000"; BACKBONE="--backbone vtr-micro"; GALLERY_N=1000
  RECIPES="--config experiments/model/meanpool.yaml --config experiments/model/xclip.yaml"
  TRAIN_BATCH=4; STEPS="--warmup 1 --steps 2"; FRONTIER_GALLERIES="1000"; T=(180 120 90 120 180)
else
  DEVICE=cuda; GALLERIES="1000 10000 100000 1000000"; BACKBONE=""; GALLERY_N=1000000
  RECIPES="--all --recipes-dir experiments/model"
  TRAIN_BATCH=32; STEPS="--warmup 3 --steps 8"; FRONTIER_GALLERIES="10000 100000"; T=(200 120 60 120 150)
fi

# ---- preflight: what a bare CUDA torch machine may lack (the project is not pip-installed)
if ! "$PY" - "$DEVICE" <<'EOF'
import importlib.util, sys
need = {"torch": "torch", "torchvision": "torchvision", "lightning": "lightning", "jsonargparse": "jsonargparse",
        "open_clip": "open_clip_torch", "ftfy": "ftfy", "regex": "regex", "av": "av", "torchmetrics": "torchmetrics",
        "einops": "einops", "matplotlib": "matplotlib", "numpy": "numpy", "tqdm": "tqdm", "rich": "rich",
        "safetensors": "safetensors", "yaml": "pyyaml"}
missing = [pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None]
if missing:
    sys.exit("run.sh: missing Python packages (pip install them, e.g. from carried wheels): " + " ".join(missing))
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"run.sh: torch {torch.__version__} sees no CUDA device (set VTR_GPU_DRY_RUN=1 for the CPU check)")
try:  # the project's own imports (and what they pull in: timm, huggingface_hub for open_clip, ...)
    import retrieval.bench.latency, retrieval.tools.compare  # noqa: F401
except ImportError as error:
    sys.exit(f"run.sh: importing the project failed: {error} (pip install {error.name or 'it'})")
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
EOF
then
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv > "$OUT/nvidia-smi.csv" 2>/dev/null

FAILED=()
RUN_STEPS=" ${VTR_GPU_STEPS:-a b c d e} "
step() {  # step NAME SECONDS ARGS...: one vtr command under its own timeout, timed
  local name=$1 limit=$2; shift 2
  if [[ "$RUN_STEPS" != *" $name "* ]]; then echo "=== ($name) not in VTR_GPU_STEPS: skipped"; return; fi
  local start=$SECONDS rc=0
  echo "=== ($name) vtr $* [timeout ${limit}s]"
  timeout -k 10 "$limit" "$PY" -m retrieval.cli "$@" || rc=$?
  [ $rc -ne 0 ] && FAILED+=("$name:rc=$rc") && echo "=== ($name) FAILED rc=$rc (124: timed out)"
  echo "=== ($name) $((SECONDS - start)) s"
}

step a "${T[0]}" bench latency $RECIPES $BACKBONE --pretrained none --device "$DEVICE" --dtype fp16 \
  --gallery $GALLERIES --batch 1 64 --real-videos 16 --offline-batch 8 --repeats 10 --warmup 2 \
  --max-seconds-per-point 2 --out "$OUT"
KERNELS="torch triton"
[ "$DEVICE" = cpu ] && KERNELS="torch"
step b "${T[1]}" bench gallery --gallery $GALLERY_N --dim 512 --store fp32 bf16 fp16 int8 --batch 1 64 --repeats 10 \
  --kernel $KERNELS --device "$DEVICE" --out "$OUT"
if [ -n "$COMPARE" ]; then
  ROLES=$("$PY" - "$COMPARE" <<'EOF'
import csv, os, sys
rows = list(csv.DictReader(open(os.path.join(sys.argv[1], "results.csv"))))
ok = [r for r in rows if os.path.isfile(os.path.join(sys.argv[1], r["method"], "checkpoints", "best.ckpt"))]
print(" ".join(r["method"] for r in ok if r["fusion_free"] == "True"), "|",
      " ".join(r["method"] for r in ok if r["fusion_free"] != "True"))
EOF
  ) || ROLES="|"
  RECALLERS=${FRONTIER_RECALLERS:-${ROLES%%|*}}; RERANKERS=${FRONTIER_RERANKERS:-${ROLES##*|}}
  if [ -z "${RECALLERS// /}" ] || [ -z "${RERANKERS// /}" ]; then
    echo "=== (c) skipped: $COMPARE/results.csv names no fusion-free and text-conditioned pair with checkpoints"
    FAILED+=("c:no-pair")
  else
    step c "${T[2]}" bench frontier --compare-dir "$COMPARE" --recallers $RECALLERS --rerankers $RERANKERS \
      -k 10 25 50 100 200 --gallery $FRONTIER_GALLERIES --repeats 5 --max-seconds-per-point 2 \
      --device "$DEVICE" --out "$OUT"
  fi
else
  echo "=== (c) skipped: no COMPARE_DIR given (bash experiments/gpu/run.sh OUT_DIR COMPARE_DIR)"
fi
step d "${T[3]}" bench train $RECIPES $BACKBONE --batch "$TRAIN_BATCH" --precision bf16 $STEPS \
  --peak-tflops 989 --device "$DEVICE" --out "$OUT"
PAIRS=""
for pair in experiments/two_stage/*.yaml; do PAIRS="$PAIRS --config $pair"; done
ENDS="--config experiments/model/clip2video.yaml --config experiments/model/prompt_switch.yaml"
ENDS="$ENDS --config experiments/model/xclip.yaml --config experiments/model/glccl.yaml"
step e "${T[4]}" bench latency $PAIRS $ENDS --rerank-k 10 50 200 $BACKBONE --pretrained none --device "$DEVICE" \
  --dtype fp16 --gallery $GALLERIES --batch 1 --real-videos 16 --offline-batch 8 --repeats 10 --warmup 2 \
  --max-seconds-per-point 2 --out "$OUT"

echo "=== done in $SECONDS s; CSVs in $OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "=== failed steps: ${FAILED[*]}"
  exit 1
fi
