"""glibc keeps freed batch memory once strnet's engine is imported; the opt-out leaves malloc alone."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "import strnet.engine, strnet.memory as m; print(m._applied)"


def run(*envs: dict[str, str]) -> list[str]:
    """What each fresh interpreter printed; they run at the same time (each spends seconds importing torch)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", CODE], env=os.environ | env, stdout=subprocess.PIPE, text=True)
        for env in envs
    ]
    outs = [p.communicate()[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs)
    return outs


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_engine_import_fixes_the_malloc_thresholds_unless_opted_out() -> None:
    assert run({}, {"STRNET_MALLOC": "default"}) == ["True", "False"]
