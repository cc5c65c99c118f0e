# scripts/bench/gpu_env.sh — sourced by the device scripts (scripts/bench/gpu_all.sh, scripts/toy/gpu_sd.sh).
# The GPU machine has no network and other package versions than our pins: `gpu_all.sh --prepare` packs diffusers /
# transformers at our pins into CARRY/pydeps.tar.gz, and this puts them ahead of everything else on PYTHONPATH.

# use_carried_pydeps CARRY REPO: unpack CARRY/pydeps.tar.gz (when there) into a private temp folder, removed when the
# script exits, and set PYTHONPATH to it then REPO. Exits 3 with a message when the archive cannot be unpacked.
use_carried_pydeps() {
  local carry=$1 repo=$2
  [[ -f $carry/pydeps.tar.gz ]] || return 0
  VILEX_PYDEPS_DIR=$(mktemp -d /tmp/vilex_pydeps.XXXXXX)
  trap 'rm -rf "$VILEX_PYDEPS_DIR"' EXIT
  if ! tar -xzf "$carry/pydeps.tar.gz" -C "$VILEX_PYDEPS_DIR"; then
    echo "setup: cannot unpack $carry/pydeps.tar.gz" >&2
    exit 3
  fi
  export PYTHONPATH="$VILEX_PYDEPS_DIR:$repo"
}
