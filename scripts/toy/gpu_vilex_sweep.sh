#!/usr/bin/env bash
# gpu_vilex_sweep.sh — several toy ViLex runs side by side on ONE GPU inside a fixed wall-clock budget, then the
# claims of each (`vilex toy ship-vilex`, sampled on the GPU). Written for a GPU machine reached through commands of
# at most 10 minutes; it runs anywhere, CPU included (slowly).
#
# The toy models are tiny, so one run keeps a GPU mostly idle (Python launch overhead); several side by side share it.
# The step budget of each run is set from a short speed probe, so every run finishes its cosine schedule in time.
#
# Inputs (ignored folders carried to the GPU machine; both optional where the packages and data are already there).
# Made here, in the repository root, with:
#   echo /.devcarry/ >> .git/info/exclude; mkdir -p .devcarry; SP=.venv/lib/python3.11/site-packages
#   tar czf .devcarry/site.tgz -C $SP --exclude=__pycache__ diffusers diffusers-*.dist-info transformers \
#     transformers-*.dist-info huggingface_hub huggingface_hub-*.dist-info httpx2 httpx2-*.dist-info httpcore2 \
#     httpcore2-*.dist-info truststore truststore-*.dist-info
#   (cd runs/toy/vilex_data && tar czf ../../../.devcarry/vilex_data.tgz dataset_info.json dataset_stats.json \
#     train/images val/images test)      # 6.5 MB; train without masks/metadata reads the same 16000 images
#   .devcarry/site.tgz        pure-Python packages at our pins that the GPU image lacks or has at other versions
#                             (diffusers, transformers, huggingface_hub, httpx2, httpcore2, truststore), put first
#                             on PYTHONPATH; torch is the image's own
#   .devcarry/vilex_data.tgz  runs/toy/vilex_data: train/images, val/images, test (with masks and metadata)
# Output (log it with `... 2>&1 | tee $OUT/sweep.log`): $OUT/<variant>.tgz (the run's config/summary/log/tensorboard,
#         its last checkpoint's pipeline/ and trainer_state.json (not the optimizer: no resuming from these), and
#         its ship folder with claims.md and the PNGs), $OUT/sweep.json
#
# Usage: BUDGET_S=560 scripts/toy/gpu_vilex_sweep.sh 2>&1 | tee sweep.log     (BUDGET_S: seconds from start to the last tarball)
#   e.g. on the device machine: mkdir -p $OUT; BUDGET_S=545 SHIP_S=130 PROBE_STEPS=60 scripts/toy/gpu_vilex_sweep.sh \
#   2>&1 | tee $OUT/sweep.log   (carry .devcarry). How the shipped toy ViLex was made with it: docs/EXPERIMENTS.md.
set -u
START=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
OUT=${OUT:-runs/toy/gpu_sweep_out}
PROBE_STEPS=${PROBE_STEPS:-60}
SHIP_S=${SHIP_S:-110}          # seconds kept for the claims
TAR_S=${TAR_S:-25}             # seconds kept for the tarballs
N_CLAIMS=${N_CLAIMS:-128}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
elapsed() { echo $(( $(date +%s) - START )); }

# name | --set overrides on configs/vilex/toy.yaml (batch 128, learning rates 4e-4 / 2e-3, high-noise share 0.5).
# The six variants compared for configs/vilex/toy.yaml (hn50_b128 = the file unchanged; results in docs/EXPERIMENTS.md).
# B32 = batch 32 with half the file's learning rates.
B32="train.global_batch_size=32 train.optim.lr_vit=2.0e-4 train.optim.lr_pooler=1.0e-3"
VARIANTS=(
  "hn25|$B32 model.decoder.high_noise_fraction=0.25"
  "hn50|$B32"
  "hn75|$B32 model.decoder.high_noise_fraction=0.75"
  "hn50_b128|"
  "hn50_uniform|$B32 model.taildrop.distribution=uniform"
  "hn50_lr3x|train.global_batch_size=32 train.optim.lr_vit=6.0e-4 train.optim.lr_pooler=3.0e-3"
)
NV=${#VARIANTS[@]}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NV > 0 ? $(nproc) / NV : 1 ))}

# ---------------------------------------------------------------- environment
if [ -f .devcarry/site.tgz ]; then
  mkdir -p /tmp/site && tar xzf .devcarry/site.tgz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .devcarry/vilex_data.tgz ] && [ ! -d runs/toy/vilex_data/train ]; then
  mkdir -p runs/toy/vilex_data && tar xzf .devcarry/vilex_data.tgz -C runs/toy/vilex_data
fi
ASSETS=assets/toy               # decoder/ and probe/
$PY -c "import torch, diffusers, transformers, vilex.cli.main; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '', '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)" || { echo "environment check failed"; exit 3; }
echo "[$(elapsed)s] setup done; $NV variants, OMP_NUM_THREADS=$OMP_NUM_THREADS"

pids=()
overrides() { local sets=""; for kv in $1; do sets="$sets --set $kv"; done; echo "$sets"; }

# ---------------------------------------------------------------- speed probe (all variants at once, as in the sweep)
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}; sets=$(overrides "${v#*|}")
  rm -rf /tmp/probe_$name
  $PY -m vilex pretrain --config configs/vilex/toy.yaml $sets --set train.max_steps=$PROBE_STEPS \
    --set train.output_dir=/tmp/probe_$name --set val.every=100000 --set train.checkpoint_every=100000 \
    --set log.tensorboard=false --set train.log_every=$(( PROBE_STEPS / 3 )) > /tmp/probe_$name.log 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"; pids=()
echo "[$(elapsed)s] probe done"
TRAIN_S=$(( BUDGET_S - $(elapsed) - SHIP_S - TAR_S - 30 ))   # 30 s: process start and the final checkpoint
[ $TRAIN_S -gt 20 ] || { echo "no time left to train ($TRAIN_S s)"; exit 4; }

# ---------------------------------------------------------------- the runs
declare -A STEPS
for v in "${VARIANTS[@]}"; do
  name=${v%%|*}; sets=$(overrides "${v#*|}")
  s=$($PY - "$name" "$TRAIN_S" <<'EOF'
import json, re, sys
import yaml
name, budget = sys.argv[1], float(sys.argv[2])
try:  # the last logged window's throughput (the first steps carry CUDA start-up), else the whole loop's
    batch = yaml.safe_load(open(f"/tmp/probe_{name}/config.yaml"))["train"]["global_batch_size"]
    rates = re.findall(r"images_per_s=([0-9.]+)", open(f"/tmp/probe_{name}.log").read())
    summ = json.load(open(f"/tmp/probe_{name}/summary.json"))
    per_step = batch / float(rates[-1]) if rates else summ["this_run"]["loop_seconds"] / summ["steps"]
except (OSError, KeyError, ZeroDivisionError, ValueError, TypeError):
    print(0); sys.exit()
print(f"{name}: {per_step * 1000:.1f} ms/step in the probe", file=sys.stderr)
print(max(0, int(0.75 * budget / per_step) // 10 * 10))  # the full runs go ~20% slower than their probe
EOF
)
  if [ "$s" -le 0 ]; then echo "$name: probe failed:"; tail -20 /tmp/probe_$name.log; continue; fi
  STEPS[$name]=$s
  every=$(( s / 4 > 10 ? s / 4 : 10 ))
  echo "[$(elapsed)s] $name: $s steps ($sets)"
  rm -rf runs/toy/gpu_$name
  timeout $(( TRAIN_S + 30 )) $PY -m vilex pretrain --config configs/vilex/toy.yaml $sets \
    --set train.max_steps=$s --set train.output_dir=runs/toy/gpu_$name --set train.checkpoint_every=$every \
    --set val.every=$(( s / 2 )) --set train.log_every=100 > runs/toy/gpu_$name.log 2>&1 &
  pids+=($!)
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"; pids=()
echo "[$(elapsed)s] training done"

# ---------------------------------------------------------------- claims, all at once
for name in "${!STEPS[@]}"; do
  rm -rf runs/toy/gpu_${name}_ship
  timeout $(( BUDGET_S - TAR_S - $(elapsed) )) $PY -m vilex toy ship-vilex --run runs/toy/gpu_$name \
    --out runs/toy/gpu_${name}_ship --assets $ASSETS --test-split runs/toy/vilex_data/test --n $N_CLAIMS \
    > runs/toy/gpu_${name}_ship.log 2>&1 &
  pids+=($!)
done
[ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"; pids=()
echo "[$(elapsed)s] claims done"

# ---------------------------------------------------------------- results
$PY - "${!STEPS[@]}" <<'EOF' | tee "$OUT/sweep.json"
import json, sys
from pathlib import Path
rows = {}
for name in sys.argv[1:]:
    run, ship = Path(f"runs/toy/gpu_{name}"), Path(f"runs/toy/gpu_{name}_ship")
    row = {}
    if (run / "summary.json").is_file():
        s = json.loads((run / "summary.json").read_text())
        row.update(steps=s.get("steps"), final_loss=s.get("final_loss"), loop_seconds=s["this_run"]["loop_seconds"])
    if (ship / "shipped_claims.json").is_file():
        c = json.loads((ship / "shipped_claims.json").read_text())
        row["psnr"] = {k: v["psnr"]["mean"] for k, v in c["arms"].items()}
        row["cell"] = {k: v["attributes"].get("cell_accuracy") for k, v in c["arms"].items()}
        row["diffs"] = {k: [v["mean"], v["ci95"]] for k, v in c["paired_psnr_differences"].items()}
        row["tfg_bg"] = c["tfg"]["tfg"]["background_changed_as_asked"]
        row["verdicts"] = c["verdicts"]
    rows[name] = row
print(json.dumps(rows, indent=1))
EOF
for name in "${!STEPS[@]}"; do
  last=$(ls -d runs/toy/gpu_$name/checkpoints/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
  tar czf "$OUT/$name.tgz" --exclude=optimizer.pt --exclude=encoder.pt runs/toy/gpu_$name/config.yaml runs/toy/gpu_$name/summary.json \
    runs/toy/gpu_$name/tensorboard runs/toy/gpu_$name/val ${last:+$last} runs/toy/gpu_$name.log \
    $( [ -d runs/toy/gpu_${name}_ship ] && echo runs/toy/gpu_${name}_ship ) runs/toy/gpu_${name}_ship.log 2>/dev/null
done
ls -la "$OUT"
echo "[$(elapsed)s] done"
