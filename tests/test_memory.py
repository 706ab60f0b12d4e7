"""glibc keeps freed batch memory once strnet's engine is imported; the opt-out leaves malloc alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "import strnet.engine, strnet.memory as m; print(m._applied)"


def run(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", CODE], env=os.environ | env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_engine_import_fixes_the_malloc_thresholds_unless_opted_out() -> None:
    assert run({}) == "True"
    assert run({"STRNET_MALLOC": "default"}) == "False"
