"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU: Triton's own front end,
LLVM and the ptxas it ships, for every Triton kernel of the package. The interpreter (TRITON_INTERPRET=1, how CI runs the kernels)
executes kernels in numpy and never compiles them, so it misses what only the compiler rejects:
a method called on an argument that Triton specialised into a constant (an int equal to 1), an
op without a lowering for a dtype, a layout conversion that cannot be emitted. Run as a script
(without TRITON_INTERPRET); prints one JSON line per kernel configuration with the registers
and the stack (spills) ptxas reported. tests/test_triton_compile.py runs it.

The counts are of kernels compiled without a launch's specialisations (strides equal to 1 as
constants, 16-byte alignment of pointers and sizes), so they run higher than a GPU launch's:
read them as a comparison between configurations of one Triton version, not as the spills of
a real step. (Triton 3.9 reports far more stack than 3.6 for the fused pass this way.)
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
    # Constexpr parameters left out take their defaults, as at a launch.
    constexprs = {**{p.name: p.default for p in fn.params
                     if p.is_constexpr and p.has_default and p.name not in signature},
                  **constexprs}
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
            "k": "i32", "tol2": "fp32", "max_sweeps": "i32"}  # a Python float arrives as fp32
    for K in (2, 16, 32, 64, pp.MAX_K):
        yield ("gram_eigh", pp._gram_eigh_kernel, eigh, {"K": K}, pp._num_warps(K))
    # k = 1 is specialised into a constant by the launcher
    yield ("gram_eigh", pp._gram_eigh_kernel, eigh, {"K": 2, "k": 1}, pp._num_warps(2))
    refill = {"r_ptr": "*fp64", "seed": "i64", "step": "i64", "step_ptr": "*i64",
              "step_on_device": "i32", "side": "i32", "p": "i32", "k": "i32"}
    for ones in ({}, {"k": 1}):
        yield ("refill_candidates", pp._refill_kernel, refill,
               {"BLOCK": pp.REFILL_BLOCK, **ones}, 4)


def _signature(fn, pointers: dict, floats=()) -> dict:
    """Every non-constexpr argument of ``fn``: pointers by name (``pointers``), floats, and
    int32 for the rest (sizes and strides of tensors under 2^31 elements, as launched)."""
    return {a: pointers.get(a, "fp32" if a in floats else "i32") for a in fn.arg_names
            if not a.isupper()}


def pass_configs():
    """The fused update + sketch pass and the sketch-only pass at the launch configurations
    launch_config picks (k <= 64, and 128; tracking off), in each weight dtype, with momentum
    (first step and later), TF32 and deterministic variants."""
    import triton.language as tl

    fs, sk = kernel_module("triton", "fused_sgd_sketch"), kernel_module("triton", "sketch")
    names = {tl.float32: "fp32", tl.bfloat16: "bf16", tl.float16: "fp16"}
    for dtype, (track, kp, first, precision, atomic) in [
            (tl.float32, (True, 32, False, "ieee", True)),
            (tl.float32, (True, 128, True, "tf32x3", False)),
            (tl.float32, (False, 16, False, "ieee", False)),
            (tl.bfloat16, (True, 16, False, "tf32", True)),
            (tl.float16, (True, 64, True, "ieee", False))]:
        bm, bn, nw = (128, 32, 8) if kp <= 64 else (64, 16, 8)
        if not track:
            bm, bn, nw = 32, 128, 4
        ptr = "*" + names[dtype]
        sig = _signature(fs._fused_sgd_sketch_kernel,
                         {"w_ptr": ptr, "g_ptr": ptr, "buf_ptr": ptr, "lr_ptr": "*fp32",
                          "u_ptr": "*fp32", "v_ptr": "*fp32", "y_ptr": "*fp32", "z_ptr": "*fp32",
                          "rsq_ptr": "*fp64"},
                         floats=("lr", "weight_decay", "momentum", "one_minus_dampening"))
        yield ("fused_sgd_sketch", fs._fused_sgd_sketch_kernel, sig, {
            "HAS_WD": True, "HAS_MOMENTUM": True, "FIRST_STEP": first, "NESTEROV": not first, "MAXIMIZE": False,
            "LR_FROM_PTR": first, "TRACK": track, "PARAM_DTYPE": dtype, "PARAM_BF16": dtype == tl.bfloat16,
            "ATOMIC_Y": atomic, "ATOMIC_Z": atomic, "PRECISION": precision, "BLOCK_M": bm, "BLOCK_N": bn,
            "K_PAD": kp}, nw)
        if track:
            sig = _signature(sk._sketch_kernel, {"w_ptr": ptr, "u_ptr": "*fp32", "v_ptr": "*fp32",
                                                 "y_ptr": "*fp32", "z_ptr": "*fp32",
                                                 "rsq_ptr": "*fp64"})
            yield ("sketch", sk._sketch_kernel, sig, {
                "ATOMIC_Y": atomic, "ATOMIC_Z": atomic, "PRECISION": precision, "BLOCK_M": bm, "BLOCK_N": bn,
                "K_PAD": kp}, nw)
    # One launch over separate same-shape tensors: addresses from a device table.
    table = {"w_ptr": "*i64", "g_ptr": "*i64", "buf_ptr": "*i64", "lr_ptr": "*fp32",
             "u_ptr": "*fp32", "v_ptr": "*fp32", "y_ptr": "*fp32", "z_ptr": "*fp32",
             "rsq_ptr": "*fp64"}
    for dtype in (tl.float32, tl.bfloat16):
        yield ("fused_sgd_sketch", fs._fused_sgd_sketch_kernel, _signature(
            fs._fused_sgd_sketch_kernel, table,
            floats=("lr", "weight_decay", "momentum", "one_minus_dampening")), {
            "HAS_WD": True, "HAS_MOMENTUM": True, "FIRST_STEP": False, "NESTEROV": False,
            "MAXIMIZE": False, "LR_FROM_PTR": False, "TRACK": True, "PARAM_DTYPE": dtype,
            "PARAM_BF16": dtype == tl.bfloat16, "ATOMIC_Y": True, "ATOMIC_Z": True,
            "PRECISION": "ieee", "BLOCK_M": 128, "BLOCK_N": 32, "K_PAD": 16, "FROM_TABLE": True}, 8)
        yield ("sketch", sk._sketch_kernel, _signature(sk._sketch_kernel, table), {
            "ATOMIC_Y": True, "ATOMIC_Z": True, "PRECISION": "ieee", "BLOCK_M": 128,
            "BLOCK_N": 32, "K_PAD": 16, "FROM_TABLE": True, "W_DTYPE": dtype}, 8)
    for dtype in ("*fp32", "*fp64"):
        yield ("sum_partials", sk._sum_partials_kernel,
               _signature(sk._sum_partials_kernel, {"src_ptr": dtype, "dst_ptr": dtype}),
               {"BLOCK": 1024}, 4)


if __name__ == "__main__":
    for config in [*postprocess_configs(), *pass_configs()]:
        print(json.dumps(compile_one(*config)), flush=True)
