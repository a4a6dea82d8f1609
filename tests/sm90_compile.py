"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU: Triton's own front end,
LLVM and the ptxas it ships. The interpreter (TRITON_INTERPRET=1, how CI runs the kernels)
executes kernels in numpy and never compiles them, so it misses what only the compiler rejects:
a method called on an argument that Triton specialised into a constant (an int equal to 1), an
op without a lowering for a dtype, a layout conversion that cannot be emitted. Run as a script
(without TRITON_INTERPRET); prints one JSON line per kernel configuration with the registers
and the stack (spills) ptxas reported. tests/test_triton_compile.py runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from lowrank.backends import kernel_module

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def usage(compiled) -> dict:
    """REG and STACK of the cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line
                  for item in line.split() if ":" in item)
    return {"regs": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1))}


def compile_one(name, fn, signature: dict, constexprs: dict, num_warps: int = 4) -> dict:
    sig = dict(signature)
    for c in constexprs:
        sig[c] = "constexpr"
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                              target=TARGET, options={"num_warps": num_warps})
    return {"kernel": name, "constexprs": {k: str(v) for k, v in constexprs.items()},
            "num_warps": num_warps, **usage(compiled)}


def postprocess_configs():
    pp = kernel_module("triton", "postprocess")
    eigh = {"a_ptr": "*fp64", "evals_ptr": "*fp64", "evecs_ptr": "*fp64", "sweeps_ptr": "*i32",
            "k": "i32", "tol2": "fp64", "max_sweeps": "i32"}
    for K in (2, 16, 32, 64, pp.MAX_K):
        yield ("gram_eigh", pp._gram_eigh_kernel, eigh, {"K": K}, pp._num_warps(K))
    # k = 1 is specialised into a constant by the launcher
    yield ("gram_eigh", pp._gram_eigh_kernel, eigh, {"K": 2, "k": 1}, pp._num_warps(2))
    refill = {"r_ptr": "*fp64", "seed": "i64", "step": "i64", "step_ptr": "*i64", "side": "i32",
              "p": "i32", "k": "i32"}
    for on_device in (False, True):
        for ones in ({}, {"side": 1, "k": 1}):
            yield ("refill_candidates", pp._refill_kernel, refill,
                   {"STEP_ON_DEVICE": on_device, "BLOCK": pp.REFILL_BLOCK, **ones}, 4)


if __name__ == "__main__":
    for config in postprocess_configs():
        print(json.dumps(compile_one(*config)), flush=True)
