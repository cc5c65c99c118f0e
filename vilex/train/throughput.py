"""throughput.py — FLOPs counted once, measured matmul peak, MFU and peak memory for the training logs."""
from __future__ import annotations

import resource
import time
from typing import Callable

import torch


def count_flops(fn: Callable[[], None]) -> int:
    """Total FLOPs of ``fn()`` (forward + backward) counted by torch's FlopCounterMode (run once)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int = 1024,
                        seconds: float = 1.0) -> float:
    """Achievable dense-matmul FLOP/s on this device and dtype (the denominator of MFU)."""
    if device.type == "cuda":
        n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        iters += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak accelerator memory (CUDA) or the process's peak resident set size (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
