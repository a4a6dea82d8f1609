"""Eager GPU step times, one process per tree (run from the tree's root)."""
import json, statistics, sys, time
import torch
import lowrank
from bench import workloads
dev = torch.device("cuda")
tag = sys.argv[1]

def make(wl_name, backend, momentum, k=16, shape=None):
    wl = workloads.build(wl_name, device=dev, dtype=torch.float32, momentum=momentum, shape=shape)
    params = [torch.nn.Parameter(p.detach().clone()) for _, p in wl.params]
    named = [(n, p) for (n, _), p in zip(wl.params, params)]
    if backend == "sgd":
        opt = torch.optim.SGD(params, lr=wl.lr, momentum=momentum)
    else:
        opt = lowrank.SpectralSGD(named, lr=wl.lr, momentum=momentum, rank=k // 2, sketch_rank=k,
                                  include=wl.tracked([k]), backend=backend)
    i = [0]
    def step():
        wl.set_grads(params, i[0]); i[0] += 1
        opt.step()
    return step

for wl_name, shape, mom in [("matrix", (1024, 1024), 0.0), ("resnet", None, 0.9), ("gpt2", None, 0.9)]:
    for backend in ["sgd", "cupy", "triton"]:
        step = make(wl_name, backend, mom, shape=shape)
        for _ in range(8): step()
        loops, hosts = [], []
        for _ in range(5):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            for _ in range(20): step()
            t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
            loops.append((t2 - t0) * 50); hosts.append((t1 - t0) * 50)
        print(json.dumps({"tree": tag, "workload": wl_name if shape is None else f"{shape[0]}x{shape[1]}", "backend": backend,
                          "step_ms": round(statistics.median(loops), 4), "host_ms": round(statistics.median(hosts), 4),
                          "min_ms": round(min(loops), 4)}), flush=True)
