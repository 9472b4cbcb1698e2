"""The router's core is plain Python: importing all of it loads no grpc, asyncio or protobuf."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import importlib, pkgutil, sys
import services.router.core as core
for module in pkgutil.walk_packages(core.__path__, "services.router.core."):
    importlib.import_module(module.name)
print(",".join(sorted(m for m in ("grpc", "asyncio", "google.protobuf", "torch") if m in sys.modules)))
"""


def test_importing_the_core_loads_no_grpc_asyncio_or_protobuf() -> None:
    # A fresh interpreter: this test process has grpc loaded already.
    out = subprocess.run([sys.executable, "-c", _PROBE], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""
