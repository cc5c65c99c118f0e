#!/usr/bin/env bash
# gpu_all.sh — every measurement of issue #21 in ONE run on one GPU (about 8 min on an H200): JSON per part + summary.
#
#   bash scripts/bench/gpu_all.sh --prepare    # on the CPU machine, right before the device call (seconds): packs the
#                                              # Python packages the GPU machine lacks into runs/bench/gpu/carry/
#   device tool: run(command="bash scripts/bench/gpu_all.sh", carry=["runs/bench/gpu/carry"], timeout_s=600)
#   bash scripts/bench/gpu_all.sh --cpu        # dry mode: the same scripts at tiny shapes on this CPU, with the
#                                              # packages the GPU machine lacks hidden (3-4 min on 2 shared cores)
#   bash scripts/bench/gpu_all.sh [--cpu] --only stage1|vlm|inference|numerics [--out-dir DIR]
#
# The GPU machine (/work/.library/device/KINDS.md) has python3 3.12 with torch 2.11, transformers 5.17 and no
# diffusers; it reaches no package registry. Our code is tested with transformers 5.24 (5.17 lacks
# activation_checkpointing_enable, which the frozen decoder calls) and diffusers 0.42.1, both pure Python and both
# content with the machine's huggingface_hub 1.33 and tokenizers 0.23: --prepare tars them from .venv (~16 MB; the
# working tree that travels must stay under 64 MiB), the run unpacks them to /tmp and puts them first on PYTHONPATH.
# The project itself runs from the copied tree (PYTHONPATH=repo), never installed.
#
# Parts, in order, with the budget each script keeps to (it skips what would not fit and ends itself; the timeout,
# budget + 15 s, is only the backstop):
#   setup        unpack + import check, fails fast                                  ~10 s
#   1 stage1     gpu_stage1.py: sweeps 256²/512², ours vs naive, ablations, profile   270 s
#   2 vlm        gpu_vlm.py: Qwen2.5-1.5B shapes, 3 towers x packed/padded x ckpt     70 s
#                gpu_vlm.py: Qwen2.5-7B shapes, bf16 states, 3 towers packed          50 s
#   3 inference  gpu_inference.py: reconstruct/compose vs diffusers, 512², 50 DDIM     50 s
#   4 numerics   gpu_numerics.py: 20 tiny steps, GPU bf16/fp32 vs CPU fp32            35 s
#   total        475 s of budgets + setup ≈ 8 min; worst case with every backstop: 560 s < the 600 s command limit.
# Results: $OUT (the device tool brings it back: 7 files, within its 8) if set, else runs/bench/gpu/ (--cpu:
# runs/bench/gpu_cpu_dry/); log.txt holds everything printed, summary.txt the table printed last.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
MODE=gpu ONLY="" OUTDIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --cpu) MODE=cpu ;;
    --only) ONLY="$2"; shift ;;
    --out-dir) OUTDIR="$2"; shift ;;
    *) echo "gpu_all.sh: unknown argument $1 (see the header)" >&2; exit 2 ;;
  esac
  shift
done
CARRY=runs/bench/gpu/carry
VENV_PY=.venv/bin/python

if [[ $MODE == prepare ]]; then
  [[ -x $VENV_PY ]] || { echo "--prepare needs .venv (make install)" >&2; exit 2; }
  SITE=$($VENV_PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$CARRY"
  tar --exclude=__pycache__ -czf "$CARRY/pydeps.tar.gz" -C "$SITE" \
    diffusers $(cd "$SITE" && ls -d diffusers-*.dist-info) transformers $(cd "$SITE" && ls -d transformers-*.dist-info)
  ls -l "$CARRY/pydeps.tar.gz"
  echo "tree that travels: $(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) bytes + carry $(du -sb "$CARRY" | cut -f1) bytes (limit 64 MiB = 67108864)"
  exit 0
fi

if [[ $MODE == cpu ]]; then
  OUTDIR=${OUTDIR:-${OUT:-runs/bench/gpu_cpu_dry}}
  PY=${PYTHON:-$VENV_PY}; [[ -x $PY ]] || PY=python3
  # Hide what the GPU machine lacks, as if not installed: python -S (no site-packages) over a copy of ours made of
  # links, less those packages; an import of one fails here as it would there. (Not hidden: httpx2, which our
  # huggingface_hub 2.x needs; the GPU machine's hub 1.33 uses its httpx instead.)
  SHADOW=$(mktemp -d /tmp/gpu_all_site.XXXXXX)
  trap 'rm -rf "$SHADOW"' EXIT
  SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  ABSENT=" deepspeed datasets webdataset lmms_eval decord gradio gradio_client fastapi starlette uvicorn selenium pycocoevalcap pycocotools wandb importlib_metadata braceexpand loguru evaluate openai transformers_stream_generator qwen_vl_utils "
  for entry in "$SITE"/*; do
    name=$(basename "$entry"); top=${name%%-*}; top=${top%.py}
    [[ $ABSENT == *" ${top,,} "* || $name == *.pth ]] || ln -s "$entry" "$SHADOW/$name"
  done
  export PYTHONPATH="$SHADOW:$REPO"
  PYS=("$PY" -S)
  TINY=(--device cpu --tiny)
  SLACK=400  # CPU dry runs are not budgeted like the GPU; the timeout only catches a hang
else
  OUTDIR=${OUTDIR:-${OUT:-runs/bench/gpu}}
  PY=${PYTHON:-python3}; [[ -z ${PYTHON:-} && -x $VENV_PY ]] && PY=$VENV_PY
  export PYTHONPATH="$REPO"
  source "$REPO/scripts/bench/gpu_env.sh"
  use_carried_pydeps "$CARRY" "$REPO"
  PYS=("$PY")
  TINY=()
  SLACK=15
fi
mkdir -p "$OUTDIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DISABLE_TQDM=1 PYTHONUNBUFFERED=1 \
  VILEX_LOG_LEVEL=WARNING PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # fewer fragmentation OOMs near the top
exec > >(tee -a "$OUTDIR/log.txt") 2>&1

echo "== setup ($MODE) $(date -u '+%Y-%m-%d %H:%M UTC'), out: $OUTDIR"
"${PYS[@]}" -c '
import sys, torch, transformers, diffusers
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| diffusers", diffusers.__version__, "from",
      diffusers.__file__.rsplit("/", 2)[0])
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(), "|", round(torch.cuda.mem_get_info()[1] / 2**30, 1), "GiB")
import vilex.models.decoders, vilex.train.loop, vlm.model, vilex.pipeline  # every module the parts import
' || { echo "setup failed: nothing measured (see above; on the GPU machine: did the call carry $CARRY, made" \
         "by --prepare?)"; exit 3; }
if [[ $MODE == gpu ]]; then
  "${PYS[@]}" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"' || exit 3
  nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv,noheader 2>/dev/null
fi

part() {  # part NAME BUDGET_S COMMAND...: run with a timeout backstop, never stop the sequence
  local name=$1 budget=$2; shift 2
  [[ -z $ONLY || $ONLY == "${name%%_*}" ]] || return 0
  echo; echo "== $name (budget ${budget} s) $(date -u +%H:%M:%S)"
  local t0=$SECONDS
  timeout -k 10 $((budget + SLACK)) "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0)) s$([[ $rc == 124 || $rc == 137 ]] && echo ' (timed out)')"
}
part stage1 270 "${PYS[@]}" scripts/bench/gpu_stage1.py ${TINY[@]+"${TINY[@]}"} --budget-s 270 --out "$OUTDIR/stage1.json"
part vlm 70 "${PYS[@]}" scripts/bench/gpu_vlm.py ${TINY[@]+"${TINY[@]}"} --budget-s 70 --out "$OUTDIR/vlm.json"
part vlm_7b 50 "${PYS[@]}" scripts/bench/gpu_vlm.py ${TINY[@]+"${TINY[@]}"} --llm qwen2.5-7b --weights bf16 --layouts packed \
  --checkpointing on --micro-batches 2 --budget-s 50 --out "$OUTDIR/vlm_7b.json"
part inference 50 "${PYS[@]}" scripts/bench/gpu_inference.py ${TINY[@]+"${TINY[@]}"} --budget-s 50 --out "$OUTDIR/inference.json"
part numerics 35 "${PYS[@]}" scripts/bench/gpu_numerics.py ${TINY[@]+"${TINY[@]}"} --out "$OUTDIR/numerics.json"

# ------------------------------------------------------------------ the summary, printed last (ratios at the very end)
echo
"${PYS[@]}" - "$OUTDIR" <<'EOF' | tee "$OUTDIR/summary.txt"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
pct = lambda x: f"{x:.1%}" if isinstance(x, (int, float)) else "-"
def print_profile(label, prof):
    if prof.get("status") != "ok":
        print(f"  {label}: {prof.get('status', 'none')}")
        return
    print(f"  {label}: {prof['busy']:.0%} busy ({prof['kernel_ms_per_step']:.1f} of {prof['wall_ms_per_step']:.1f} "
          f"ms/step); top: " + "; ".join(f"{k['share']:.0%} {k['name'][:40]}" for k in prof["top"][:4]))
s1, v, v7, inf, num = (load(n) for n in ("stage1.json", "vlm.json", "vlm_7b.json", "inference.json", "numerics.json"))
env = next((d["environment"] for d in (s1, v, inf) if d and "environment" in d), {})
print(f"SUMMARY — {env.get('device', '?')}, torch {env.get('torch', '?')}, {env.get('date_utc', '?')} UTC")
goals = []
if s1:
    print(f"stage 1 (matmul peak {s1['matmul_peak_tflops']:.3g} TFLOP/s, {s1['elapsed_s']:.0f} s"
          f"{'' if s1.get('complete') else ', INCOMPLETE'}):")
    for r in s1["rows"]:
        if r["group"] == "sweep":
            print(f"  {r['recipe']:6} {r['resolution']}² batch {r['batch']:4d}: "
                  + (f"{r['img_per_s']:8.1f} img/s  MFU {pct(r['mfu']):>6}  {r['peak_mem_gib']:6.1f} GiB"
                     if r.get("status") == "ok" else r.get("status", "?")))
    summ = s1.get("summary") or {}
    for a in summ.get("ablations", []):
        print(f"  ablation {a['ablation']:40.40} {a['resolution']}²: {a['speedup']:5.2f}x img/s, "
              f"{a['peak_mem_ratio']:4.2f}x memory")
    for r in s1["rows"]:
        if r["group"] == "ablation" and r.get("status") not in ("ok", None):
            print(f"  ablation {r['ablation'] or r['recipe']:40.40} {r['resolution']}²: {r['status'][:70]}")
    for res, prof in (s1.get("profile") or {}).items():
        print_profile(f"profile ours {res}² batch {prof.get('batch')}", prof)
    best = summ.get("best", {}).get("256")
    goals.append(f"1a stage-1 MFU at 256², best batch: {pct(best['mfu']) if best else '-'} (goal >= 40 %)")
    ratios = [x for x in summ.get("ours_vs_naive", [])]
    goals.append("1b ours / naive at equal batch: " + (", ".join(f"{x['speedup']:.2f}x ({x['resolution']}², {x['batch']})"
                                                          for x in ratios) or "-") + " (goal >= 3x)")
    for x in summ.get("paying_vs_naive", []):
        goals.append(f"1b ours + what paid ({x['ablation'][8:]}) / naive, {x['resolution']}², batch {x['batch']}: "
                     f"{x['speedup']:.2f}x")
for d, label in ((v, "stage 2"), (v7, "stage 2, 7B shapes")):
    if not d:
        continue
    print(f"{label}: {d['llm']} ({d['llm_params'] / 1e9:.2f}e9, {d['weights']}, {d['training_state_gib']:.0f} GiB state), "
          f"{d['elapsed_s']:.0f} s{'' if d.get('complete') else ', INCOMPLETE'}:")
    for r in d["rows"]:
        print(f"  {r['tower']:12} {r['image_tokens']:4d} tok {r['layout']:6} ckpt {str(r['checkpointing']):5}: "
              + (f"{r['samples_per_s']:7.2f} samples/s {r['tokens_per_s']:8.0f} tok/s  MFU {pct(r['mfu']):>6}  "
                 f"{r['peak_mem_gib']:6.1f} GiB" if r.get("status") == "ok" else r.get("status", "?")))
    print_profile(f"profile {(d.get('profile') or {}).get('tower')} {(d.get('profile') or {}).get('layout')}",
                  d.get("profile") or {})
    summ = d.get("summary") or {}
    for p in summ.get("packed_vs_padded", []):
        print(f"  packed / padded {p['tower']} ckpt {p['checkpointing']}: {p['speedup']:.2f}x")
    b = summ.get("best_packed_mfu")
    goals.append(f"2a {label} packed MFU: {pct(b['mfu']) if b else '-'} (goal >= 40 %)")
    for x in summ.get("vs_siglip", []):
        if x["tower"] == "vilex" and x["layout"] == "packed" and x["checkpointing"]:
            tok = {t: d["towers"][t]["image_tokens"] for t in ("vilex", "siglip")}
            goals.append(f"2b {label} ViLex ({tok['vilex']} tok) vs SigLIP ({tok['siglip']} tok), packed, same "
                         f"LLM: {x['samples_per_s_speedup']:.2f}x samples/s")
if inf:
    print(f"inference ({inf['pixels']}², {inf['num_inference_steps']} DDIM steps, guidance {inf['guidance_scale']}, "
          f"{inf['elapsed_s']:.0f} s):")
    for r in inf["rows"]:
        print(f"  {r['pipeline']:16} batch {r['batch']}: " + (f"{r['images_per_s']:.3f} images/s"
                                                              if "images_per_s" in r else r.get("status", "?")))
    ratios = inf.get("summary") or []
    goals.append("3 ours / diffusers images/s: " + (", ".join(f"{x['pipeline'][5:]} b{x['batch']} {x['vs_diffusers']:.2f}x"
                                                       for x in ratios) or "-") + " (goal >= 1.00)")
if num:
    for name, c in num["comparisons"].items():
        goals.append(f"4 numerics {name} vs cpu fp32, {num['steps']} steps: max |Δloss| "
                     + (f"{c['max_abs_delta']:.2e} <= {c['tolerance']:.0e}: {c['status']}" if "max_abs_delta" in c
                        else c["status"]))
print("GOALS / RATIOS")
for g in goals:
    print("  " + g)
EOF
