#!/usr/bin/env bash
# Launch `vilex pretrain` on many processes / nodes.
#
#   scripts/launch_pretrain.sh NPROC CONFIG [vilex pretrain args...]
#
#   NPROC      processes per node (GPUs per node; on CPU any number, gloo backend)
#   CONFIG     configs/vilex/<exp>.yaml  (set train.strategy: deepspeed + train.deepspeed_config for ZeRO)
#
# Environment:
#   LAUNCHER=torchrun (default) | deepspeed
#   HOSTFILE=path     multi-node with the deepspeed launcher ("host slots=N" per line)
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node with torchrun (run once per node)
#
# Examples:
#   scripts/launch_pretrain.sh 8 configs/vilex/sd21base_siglip_so400m.yaml --resume auto
#   LAUNCHER=deepspeed HOSTFILE=hosts.txt scripts/launch_pretrain.sh 8 configs/vilex/sd21base_siglip_so400m.yaml
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch_pretrain.sh 8 configs/vilex/sd21base_siglip_so400m.yaml
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,20p' "$0"; exit 2; fi
NPROC=$1; CONFIG=$2; shift 2
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
case "${LAUNCHER:-torchrun}" in
  torchrun)
    exec "$PY" -m torch.distributed.run \
      --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
      --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
      -m vilex pretrain --config "$CONFIG" "$@" ;;
  deepspeed)
    HOSTARGS=()
    [[ -n "${HOSTFILE:-}" ]] && HOSTARGS=(--hostfile "$HOSTFILE")
    exec "$PY" -m deepspeed.launcher.runner "${HOSTARGS[@]}" --num_gpus "$NPROC" --no_local_rank \
      --module vilex pretrain --config "$CONFIG" "$@" ;;
  *) echo "LAUNCHER must be torchrun or deepspeed" >&2; exit 2 ;;
esac
