"""Device resolution and description, shared by the model-running services."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from services.common import device
from services.common.config import ConfigError
from services.common.device import device_stats, native_bfloat16, resolve_device, torch_dtype


def test_auto_picks_what_exists() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


def test_missing_cuda_is_a_config_error_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # any machine, with CUDA or not
    with pytest.raises(ConfigError, match=re.escape("worker.device='cuda'")):
        resolve_device("cuda", "worker.device")


def test_cpu_stats_describe_host_memory() -> None:
    stats = device_stats(torch.device("cpu"), "bfloat16")
    assert stats.type == "cpu"
    assert stats.name
    assert stats.memory_total_bytes >= stats.memory_used_bytes > 0
    assert stats.dtype == "bfloat16"


def test_torch_dtype_names() -> None:
    assert [torch_dtype(n) for n in ("bfloat16", "float16", "float32")] == [
        torch.bfloat16,
        torch.float16,
        torch.float32,
    ]


def test_importing_device_stats_does_not_import_torch() -> None:
    # Pure cores (the embedder's engine) hold DeviceStats and must stay torch-free.
    code = "import sys, services.common.device, services.common.convert; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ({"avx512f", "avx512_bf16"}, True),
        ({"amx_tile", "amx_bf16"}, True),
        ({"avx2", "avx512f"}, False),
        (set(), False),
    ],
)
def test_native_bfloat16_on_cpu_follows_the_cpu_flags(
    monkeypatch: pytest.MonkeyPatch, flags: set[str], native: bool
) -> None:
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(flags))
    assert native_bfloat16(torch.device("cpu")) is native


def test_cpu_flags_read_this_machine() -> None:
    with open("/proc/cpuinfo") as f:
        listed = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert device.cpu_flags() == frozenset(listed)
