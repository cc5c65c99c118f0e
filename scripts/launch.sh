#!/usr/bin/env bash
# Launch any `vilex` command on many processes / nodes: `vilex pretrain` (stage 1), `vilex train-vlm` (stage 2), ...
#
#   scripts/launch.sh NPROC COMMAND [args of `vilex COMMAND`...]
#
#   NPROC      processes per node (GPUs per node; on CPU any number, gloo backend)
#   COMMAND    the vilex subcommand and its arguments, exactly as for a single process
#
# Environment:
#   LAUNCHER=torchrun (default) | deepspeed
#   NNODES, NODE_RANK          nodes in the job and this node's index (torchrun: run this script once on every node;
#                              NODE_RANK 0 is the node at MASTER_ADDR)
#   MASTER_ADDR, MASTER_PORT   where rank 0 listens (default 127.0.0.1:29500; pick another port for a 2nd job)
#   HOSTFILE=path              deepspeed launcher: "host slots=N" per line; run once, on the first host: it starts
#                              every node over ssh (pdsh) in this directory (NNODES caps how many hosts it uses)
#   PYTHON=path                interpreter (default: this checkout's .venv/bin/python, else python)
#   OMP_NUM_THREADS            CPU threads per process (default 1)
#
# The strategy (DDP, DeepSpeed ZeRO-2/3) is the experiment config's; either launcher runs either strategy.
#
# Examples:
#   scripts/launch.sh 8 pretrain --config configs/vilex/sd21base_siglip_so400m.yaml --resume auto
#   scripts/launch.sh 8 train-vlm --config configs/vlm/qwen2.5-7b_vilex.yaml --stage instruct
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch.sh 8 train-vlm --config C --stage instruct   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/launch.sh 8 train-vlm --config C --stage instruct   # on node1
#   LAUNCHER=deepspeed HOSTFILE=hosts.txt scripts/launch.sh 8 train-vlm --config C --stage instruct
set -euo pipefail
if [[ $# -lt 2 ]]; then sed -n '2,26p' "$0"; exit 2; fi
NPROC=$1; shift
if ! [[ "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC must be a positive number of processes per node, got '$NPROC' (usage: $0 NPROC COMMAND ...)" >&2
  exit 2
fi
HERE="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-$HERE/.venv/bin/python}"
[[ -x "$PY" ]] || PY=python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
case "${LAUNCHER:-torchrun}" in
  torchrun)
    exec "$PY" -m torch.distributed.run \
      --nproc_per_node "$NPROC" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
      --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
      -m vilex "$@" ;;
  deepspeed)
    ARGS=(--num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}")
    [[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
    [[ -n "${NNODES:-}" ]] && ARGS+=(--num_nodes "$NNODES")
    [[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
    exec "$PY" -m deepspeed.launcher.runner "${ARGS[@]}" --no_local_rank --module vilex "$@" ;;
  *) echo "error: LAUNCHER must be torchrun or deepspeed, got '${LAUNCHER}'" >&2; exit 2 ;;
esac
