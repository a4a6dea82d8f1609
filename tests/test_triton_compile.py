"""Every Triton kernel of the package compiles for an H100 (sm_90) here, without a GPU:
tests/sm90_compile.py runs Triton's compiler and the ptxas it ships in a subprocess (the
interpreter, which CI runs the kernels in, never compiles them), over the launch
configurations the launchers pick."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not all(os.path.exists(os.path.join(BIN, tool)) for tool in ("ptxas", "cuobjdump")),
                    reason="this Triton build ships no ptxas / cuobjdump")
def test_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(HERE, "sm90_compile.py")], env=env,
                         capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"gram_eigh", "refill_candidates", "fused_sgd_sketch",
                                           "sketch", "sum_partials"}
    assert len(rows) == 23
    for r in rows:
        assert r["regs"] > 0, r  # ptxas produced a kernel and cuobjdump read it
