"""distributed.py — process-group setup shared by the training strategies (CPU gloo or GPU nccl).

Launchers (`torchrun`, `deepspeed`) set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a
plain `vilex pretrain` has none of them and runs as one process without a process group.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment (0, 1, 0 for a plain run)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env_world()[2])
    return torch.device("cpu")


def resolve_device(name: str, option: str = "device") -> torch.device:
    """A device option (named ``option`` in errors): 'auto' -> cuda when available, else cpu; an unavailable cuda
    device is a UserError."""
    from vilex.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option}: not a torch device: {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option}={name}: no CUDA device is available here")
    return device


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory op at init (~40 s, unused by gloo): skip it."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init_process_group_if_needed(backend: str | None = None) -> None:
    """Join the launcher's process group (once); no-op for a single plain process."""
    rank, world, local = env_world()
    if world == 1 or dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    # Collectives wait this long before failing: a first run encodes its latent cache (each rank its share) before
    # step 1, and the libraries' 10-30 min defaults would abort a large one; build big caches beforehand with
    # `vilex cache-latents` under the same launcher.
    minutes = float(os.environ.get("VILEX_COLLECTIVE_TIMEOUT_MIN", "120"))
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=timedelta(minutes=minutes))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def shutdown_and_exit(code: int = 0) -> None:
    """End a worker cleanly: destroying the group then os._exit avoids rare gloo aborts at interpreter exit."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # pragma: no cover - best effort at exit
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
