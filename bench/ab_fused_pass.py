"""A/B timing of the CuPy fused pass (update + sketch), one tree per process.

    PYTHONPATH=TREE python3 bench/ab_fused_pass.py TAG >> ab.jsonl

Run it for two source trees in alternating processes on one GPU (old, new, old, new; e.g. the
old tree from ``git archive REV | tar -x -C .ab/old``) and compare the best median per
configuration. Each line: tag, shape, k, momentum, median / p20 / p80 ms
(``triton.testing.do_bench``, cold L2; the call's host launch work is inside the timing), the
sketch's normwise relative error against the torch reference (``ey``, ``ez``) and the weights'
largest difference from it (``ew``), with the device, versions and date.
"""

import datetime
import json
import sys

import torch
import triton
import triton.testing as tt

from lowrank import backends
from lowrank.fused_sgd_sketch import fused_sgd_sketch_torch

fused = backends.kernel_module("cupy", "fused_sgd_sketch").fused_sgd_sketch_cupy
tag = sys.argv[1]
meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
            triton=triton.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
for m, n in [(4096, 4096), (8192, 8192), (4096, 16384)]:
    g = torch.Generator(device="cuda").manual_seed(0)
    W0 = torch.randn(m, n, device="cuda", generator=g)
    G = torch.randn(m, n, device="cuda", generator=g) * 1e-3
    for mom in (0.0, 0.9):
        for k in (8, 16, 32, 64):
            U = torch.randn(1, m, k, device="cuda", generator=g) / m**0.5
            V = torch.randn(1, n, k, device="cuda", generator=g) / n**0.5
            # Correctness first: one step from the same state against the torch reference.
            Wa, Wb = W0.clone(), W0.clone()
            Ba = torch.randn(m, n, device="cuda", generator=g) if mom else None
            Bb = Ba.clone() if mom else None
            out, _ = fused(Wa, G, Ba, U, V, lr=0.01, momentum=mom)
            ref, _ = fused_sgd_sketch_torch(Wb, G, Bb, U, V, lr=0.01, momentum=mom)
            ey = ((out.Y - ref.Y).norm() / ref.Y.norm()).item()
            ez = ((out.Z - ref.Z).norm() / ref.Z.norm()).item()
            ew = (Wa - Wb).abs().max().item()
            W = W0.clone()
            state = {"buf": torch.zeros_like(W) if mom else None}

            def step(W=W, G=G, U=U, V=V, mom=mom, state=state):
                _, state["buf"] = fused(W, G, state["buf"], U, V, lr=1e-6, momentum=mom)

            step()
            p20, p50, p80 = tt.do_bench(step, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=200)
            print(json.dumps(dict(tag=tag, m=m, n=n, k=k, mom=mom, ms=p50, p20=p20, p80=p80,
                                  ey=ey, ez=ez, ew=ew, **meta)), flush=True)
            del W, state, Wa, Wb, Ba, Bb
    del W0, G
    torch.cuda.empty_cache()
