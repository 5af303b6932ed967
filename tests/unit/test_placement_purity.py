"""placement/ stays pure numpy: importing any module pulls in no ray, torch, triton, cupy or cuda."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = sorted(p.stem for p in (ROOT / "placement").glob("*.py") if p.stem != "__init__")
FORBIDDEN = ("ray", "torch", "triton", "cupy", "cuda")


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_no_framework(module):
    code = (
        f"import sys, placement.{module}\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"placement.{module} imported {out.stdout.strip()}"
