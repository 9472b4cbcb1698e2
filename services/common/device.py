"""Which torch device a service runs on and what it looks like, for GetInfo and load reports.

Shared by the services that run a model (worker, embedder); protobuf stays in convert modules.
torch is imported only where a device is resolved or measured, so cores can hold a DeviceStats
without it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from services.common.config import ConfigError

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass(frozen=True)
class DeviceStats:
    type: str  # "cpu", "cuda" or "mps"
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    dtype: str


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config value ("bfloat16", "float16" or "float32")."""
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def resolve_device(name: str, setting: str = "device") -> torch.device:
    """The torch device for a config value: auto picks cuda when present, else cpu.

    An explicit device that is not there is a ConfigError naming `setting`.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name!r}: no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{setting}={name!r}: MPS is not available")
    return torch.device(name)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matmuls in hardware (faster than float32 there): a
    GPU that supports it, or a CPU with AVX512-BF16 or AMX."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def device_stats(device: torch.device, dtype: str) -> DeviceStats:
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceStats("cuda", torch.cuda.get_device_name(device), total, total - free, dtype)
    total, available = _host_memory()
    return DeviceStats(device.type, _cpu_name(), total, total - available, dtype)


def _host_memory() -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


# Load reports ask for it every few seconds; it does not change while the process runs.
@functools.cache
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
