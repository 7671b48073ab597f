"""Which arithmetic and memory layout a run uses (``--precision``, ``--channels-last``), decided in one place: at parse
time for the early error, by the engine, and by whatever builds a frozen teacher.

Kept apart from ``seed.engine`` so that the config can check a precision without importing the training engine.
"""

import platform
from typing import Any

import torch

from seed.errors import SeedError


def resolve_precision(config: Any) -> str:
    """``auto``: bf16 autocast on GPUs that support it, fp16 on older ones, fp32 on CPU."""
    on_gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if config.precision != "auto":
        return check_cpu_bf16(config.precision, on_gpu)
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def native_cpu_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware: AVX512-BF16 or AMX on x86 (other architectures are left to their kernels)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def check_cpu_bf16(precision: str, on_gpu: bool) -> str:
    """``precision``, unless it asks for bf16 on an x86 CPU without bf16 units: oneDNN emulates bf16 there, and the step
    ran 2x (AVX-512) to 26x (AVX2) slower than fp32 (docs/RELIABILITY.md), so such a run is refused up front."""
    if on_gpu or not precision.startswith("bf16") or native_cpu_bf16():
        return precision
    raise SeedError(f"--precision {precision}: this CPU has no bf16 units (AVX512-BF16 or AMX), so bf16 is emulated there, 2-26x slower "
                    "than fp32; use --precision 32-true (the CPU default) or run on a GPU")


def use_channels_last(config: Any) -> bool:
    """``--channels-last``, by default on GPUs: convolutions in NHWC (faster there and on CPUs: docs/BENCHMARKS.md)."""
    chosen = getattr(config, "channels_last", None)
    if chosen is not None:
        return bool(chosen)
    return config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
