"""A/B timing of the CuPy fused pass (update + sketch), one tree per process.

    PYTHONPATH=TREE python3 bench/ab_fused_pass.py TAG >> ab.jsonl

Run it for two source trees in alternating processes on one GPU (old, new, old, new; e.g. the
old tree from ``git archive REV | tar -x -C .ab/old``) and compare the best median per
configuration. Each line: tag, shape, k, momentum, median / p20 / p80 ms
(``triton.testing.do_bench``, cold L2; the call's host launch work is inside the timing), the
errors of one step against the torch reference (``bench.gpu_check.fused_errors``: ``ew`` of the
weights, ``ey``, ``ez`` of the sketches), with the device, versions and date.
"""

import datetime
import json
import sys

import torch
import triton
import triton.testing as tt

from bench.gpu_check import fused_errors
from lowrank import backends

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
            # Correctness first: one step from the same state against the torch reference.
            ew, ey, ez = fused_errors(fused, m, n, k, mom)
            U = torch.randn(1, m, k, device="cuda", generator=g) / m**0.5
            V = torch.randn(1, n, k, device="cuda", generator=g) / n**0.5
            W = W0.clone()
            state = {"buf": torch.zeros_like(W) if mom else None}

            def step(W=W, G=G, U=U, V=V, mom=mom, state=state):
                _, state["buf"] = fused(W, G, state["buf"], U, V, lr=1e-6, momentum=mom)

            step()
            p20, p50, p80 = tt.do_bench(step, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=200)
            print(json.dumps(dict(tag=tag, m=m, n=n, k=k, mom=mom, ms=p50, p20=p20, p80=p80,
                                  ey=ey, ez=ez, ew=ew, **meta)), flush=True)
            del W, state
    del W0, G
    torch.cuda.empty_cache()
