#!/usr/bin/env bash
# Launch `vilex pretrain` on many processes / nodes: scripts/launch.sh with the command filled in (the same
# environment knobs: LAUNCHER, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, HOSTFILE; see scripts/launch.sh).
#
#   scripts/launch_pretrain.sh NPROC CONFIG [vilex pretrain args...]
#
# Examples:
#   scripts/launch_pretrain.sh 8 configs/vilex/sd21base_siglip_so400m.yaml --resume auto
#   LAUNCHER=deepspeed HOSTFILE=hosts.txt scripts/launch_pretrain.sh 8 configs/vilex/sd21base_siglip_so400m.yaml
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch_pretrain.sh 8 configs/vilex/sd21base_siglip_so400m.yaml
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,10p' "$0"; exit 2; fi
NPROC=$1; CONFIG=$2; shift 2
exec "$(dirname "$0")/launch.sh" "$NPROC" pretrain --config "$CONFIG" "$@"
