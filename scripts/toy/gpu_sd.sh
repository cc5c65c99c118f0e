#!/usr/bin/env bash
# gpu_sd.sh — train the 64-px toy world's miniature Stable Diffusion UNet (configs/toy/sd.yaml) on ONE GPU inside a
# fixed wall-clock budget, a few variants side by side, run each one's quality gate there, and bring back what
# `vilex toy pretrain-decoder` writes (the StableDiffusionPipeline folder, its recipe with the gate, samples.png).
#
# Why a GPU: on the 2-core machine the UNet does ~1.6 steps/s of batch 32; its gate (colour >= 0.85, count / shape /
# cell >= 0.70) wants far more samples than a session's CPU hours give (3000 steps: colour 0.75, shape 0.30; see
# docs/EXPERIMENTS.md). The UNet is tiny, so one run leaves a GPU mostly idle: variants share it.
#
#   bash scripts/bench/gpu_all.sh --prepare   # packs the pure-Python packages the GPU machine lacks (diffusers,
#                                             # transformers at our pins) into runs/bench/gpu/carry/
#   device tool: run(command="bash scripts/toy/gpu_sd.sh", carry=["runs/bench/gpu/carry"], timeout_s=600)
#   bash scripts/toy/gpu_sd.sh --cpu          # dry mode on this CPU: tiny budget and steps, the same code paths
#
# Environment knobs: BUDGET_S (seconds from start to the last file written, default 520), GATE_S (kept for the
# gates, 100), PROBE_STEPS (speed probe, 40), VARIANTS (see below), OUT (results; the device tool's $OUT).
# Results in $OUT, at most 8 files of <= 16 MiB (the device tool's limits): per variant <name>_unet.safetensors (the
# fp32 EMA UNet, 15.6 MB) and <name>.tgz (the rest of the folder: recipe.json with the gate, samples.png, the
# configs, the train log); summary.json. Rebuild a folder here with scripts/toy/README.md ("The mini SD on a GPU").
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
MODE=gpu
[[ ${1:-} == --cpu ]] && MODE=cpu
[[ $# -gt 0 && $MODE != cpu ]] && { echo "gpu_sd.sh: unknown argument $1 (see the header)" >&2; exit 2; }
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
CARRY=runs/bench/gpu/carry

# name|--set overrides on configs/toy/sd.yaml (batch 32, lr 7e-4 there). Batch 128 with the learning rate scaled by
# sqrt(4) and a longer warmup is the main candidate; the second variant draws its high-noise half from t >= 600
# instead of 900, where `vilex toy decoder-commitment` shows shape and count being decided (scripts/toy/README.md).
DEFAULT_VARIANTS="b128|train.global_batch_size=128 train.lr=1.4e-3 train.warmup_steps=300
b128_t600|train.global_batch_size=128 train.lr=1.4e-3 train.warmup_steps=300 train.high_noise_min_t=600"
VARIANTS=${VARIANTS:-$DEFAULT_VARIANTS}

if [[ $MODE == cpu ]]; then
  OUT=${OUT:-runs/toy/gpu_sd_cpu_dry}
  RUNS=${RUNS:-$OUT/runs}
  PY=${PYTHON:-.venv/bin/python}
  DEVICE=cpu BUDGET_S=${BUDGET_S:-240} GATE_S=${GATE_S:-60} PROBE_STEPS=${PROBE_STEPS:-3} WORKERS=1 THREADS=1
  # a tiny gate: enough to prove the path, not to judge
  EXTRA="train.global_batch_size=8 gate.n_scenes=8 gate.ddim_steps=2 gate.batch_size=8 gate.grid_images=4"
  MAX_STEPS_CAP=6
else
  OUT=${OUT:-runs/toy/gpu_sd}
  RUNS=${RUNS:-runs/toy}   # not under $OUT: only the files below come back
  PY=${PYTHON:-python3}
  DEVICE=cuda BUDGET_S=${BUDGET_S:-520} GATE_S=${GATE_S:-100} PROBE_STEPS=${PROBE_STEPS:-40}
  NV=$(printf '%s\n' "$VARIANTS" | grep -c .)
  WORKERS=$(( ($(nproc) - NV) / NV > 0 ? ($(nproc) - NV) / NV : 1 ))  # scene rendering, ~3 ms per 64-px scene
  THREADS=1
  EXTRA=""
  MAX_STEPS_CAP=100000
fi
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$REPO" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 DISABLE_TQDM=1
if [[ $MODE == gpu ]]; then
  source "$REPO/scripts/bench/gpu_env.sh"
  use_carried_pydeps "$CARRY" "$REPO"
fi
exec > >(tee -a "$OUT/log.txt") 2>&1
echo "== gpu_sd.sh ($MODE) $(date -u '+%Y-%m-%d %H:%M UTC'), out: $OUT"
"$PY" -c "
import torch, diffusers, transformers, toy.pretrain_decoder
print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)
if '$DEVICE' == 'cuda':
    assert torch.cuda.is_available(), 'no CUDA device'
    print('gpu:', torch.cuda.get_device_name())
" || { echo "setup failed (on the GPU machine: did the call carry $CARRY, made by gpu_all.sh --prepare?)"; exit 3; }

sets() { local s=""; for kv in $1 $EXTRA; do s="$s --set $kv"; done; echo "$s"; }
names=()
while IFS= read -r v; do [[ -n $v ]] && names+=("${v%%|*}"); done <<< "$VARIANTS"
over() { printf '%s\n' "$VARIANTS" | grep "^$1|" | cut -d'|' -f2; }
common="--config configs/toy/sd.yaml --set train.device=$DEVICE --set train.num_workers=$WORKERS"
common="$common --set train.threads=$THREADS"

# ---------------------------------------------------------------- speed probe: every variant at once, as they will run
pids=()
for n in "${names[@]}"; do
  rm -rf "/tmp/sd_probe_$n"
  "$PY" -m vilex toy pretrain-decoder $common $(sets "$(over "$n")") --set train.max_steps=$PROBE_STEPS \
    --set work_dir=/tmp/sd_probe_$n/work --set gate.enabled=false \
    --set train.log_every=$(( PROBE_STEPS > 4 ? PROBE_STEPS / 4 : 1 )) \
    --set train.checkpoint_every=100000 --out /tmp/sd_probe_$n/out > "/tmp/sd_probe_$n.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
echo "[$(elapsed)s] probe done"
TRAIN_S=$(( BUDGET_S - $(elapsed) - GATE_S - 30 ))  # 30 s: start-up, the last checkpoint, the files
[[ $TRAIN_S -gt 20 ]] || { echo "no time left to train ($TRAIN_S s)"; exit 4; }

# ---------------------------------------------------------------- the runs (each ends by max_steps or max_minutes)
pids=()
for n in "${names[@]}"; do
  steps=$("$PY" - "/tmp/sd_probe_$n/work/train_log.jsonl" "$TRAIN_S" "$MAX_STEPS_CAP" <<'EOF'
import json, sys
path, budget, cap = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
try:  # the last logged window (the first steps carry CUDA start-up and the workers' first scenes)
    rows = [json.loads(line) for line in open(path) if "sec_per_step" in line]
    per_step = float(next(v for k, v in rows[-1].items() if k.endswith("sec_per_step")))
except (OSError, IndexError, StopIteration, ValueError):
    print(0); sys.exit()
print(f"{per_step * 1000:.1f} ms/step in the probe", file=sys.stderr)
print(min(cap, max(0, int(0.85 * budget / per_step) // 10 * 10)))
EOF
)
  if [[ $steps -le 0 ]]; then echo "$n: probe failed:"; tail -20 "/tmp/sd_probe_$n.log"; continue; fi
  echo "[$(elapsed)s] $n: $steps steps ($(over "$n"))"
  rm -rf "$RUNS/gpu_sd_$n" "$RUNS/gpu_sd_${n}_work"
  "$PY" -m vilex toy pretrain-decoder $common $(sets "$(over "$n")") --set train.max_steps=$steps \
    --set train.max_minutes=$(( TRAIN_S / 60 + 1 )) --set work_dir="$RUNS/gpu_sd_${n}_work" \
    --set train.log_every=100 --set train.checkpoint_every=$(( steps / 4 > 10 ? steps / 4 : 10 )) \
    --out "$RUNS/gpu_sd_$n" > "$RUNS/gpu_sd_$n.log" 2>&1 &
  pids+=($!)
done
[[ ${#pids[@]} -gt 0 ]] && wait "${pids[@]}"
echo "[$(elapsed)s] training and gates done"

# ---------------------------------------------------------------- results
for n in "${names[@]}"; do
  d=gpu_sd_$n
  if [[ ! -f $RUNS/$d/unet/diffusion_pytorch_model.safetensors ]]; then
    echo "$n: no folder written:"; tail -30 "$RUNS/$d.log"; continue
  fi
  cp "$RUNS/$d/unet/diffusion_pytorch_model.safetensors" "$OUT/${n}_unet.safetensors"
  tar czf "$OUT/$n.tgz" -C "$RUNS" --exclude="$d/unet/diffusion_pytorch_model.safetensors" "$d" "$d.log" \
    "${d}_work/train_log.jsonl"
done
"$PY" - "$RUNS" "${names[@]}" <<'EOF' | tee "$OUT/summary.json"
import json, sys
from pathlib import Path
rows = {}
for name in sys.argv[2:]:
    recipe = Path(sys.argv[1]) / f"gpu_sd_{name}" / "recipe.json"
    if recipe.is_file():
        m = json.loads(recipe.read_text())["metrics"]
        rows[name] = {"steps": m.get("steps_done"), "minutes": m.get("train_minutes_this_run"), "gate": m.get("gate")}
print(json.dumps(rows, indent=1, default=str))
EOF
ls -la "$OUT"
echo "[$(elapsed)s] done"
