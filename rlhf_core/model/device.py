"""Where a stage runs (CPU, CUDA, MPS; its thread count) and how its randomness starts.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from rlhf_core.errors import ConfigError


def resolve_device(name: str, cpu_threads: int = 0) -> torch.device:
    """`auto` → CUDA if available, else MPS if available, else CPU; explicit names are checked.

    On CPU, ``cpu_threads`` > 0 fixes torch's intra-op threads (1: single-threaded kernels, whose float
    reductions cannot be reordered by thread scheduling).
    """
    device = pick_device(name)
    if device.type == "cpu" and cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    return device


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r}: CUDA is not available on this machine; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for one process, and ask torch for deterministic kernels.

    On CPU this makes a stage's outputs a function of its inputs and params.  On CUDA, cuBLAS needs
    CUBLAS_WORKSPACE_CONFIG (set here unless already set); ops without a deterministic kernel only
    warn, so GPU runs are repeatable on the same hardware and software stack, not across them.
    """
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
