"""Where an eager GPU SpectralSGD step spends host time (session 19)."""
import collections, cProfile, io, pstats, sys, time, warnings, traceback
import torch
import lowrank
from bench import workloads

dev = torch.device("cuda")

def make(wl_name, backend, momentum, k=16, shape=None):
    wl = workloads.build(wl_name, device=dev, dtype=torch.float32, momentum=momentum, shape=shape)
    params = [torch.nn.Parameter(p.detach().clone()) for _, p in wl.params]
    named = [(n, p) for (n, _), p in zip(wl.params, params)]
    tracked = wl.tracked([k])
    if backend == "sgd":
        opt = torch.optim.SGD(params, lr=wl.lr, momentum=momentum)
    else:
        opt = lowrank.SpectralSGD(named, lr=wl.lr, momentum=momentum, rank=k // 2, sketch_rank=k,
                                  include=tracked, backend=backend)
    i = [0]
    def step():
        wl.set_grads(params, i[0]); i[0] += 1
        opt.step()
    def grads_only():
        wl.set_grads(params, i[0]); i[0] += 1
    return step, grads_only

def loop_ms(fn, n):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t0) * 1e3 / n

def host_ms(fn, n):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): fn()
    t = (time.perf_counter() - t0) * 1e3 / n; torch.cuda.synchronize(); return t

for wl_name, shape, mom in [("matrix", (1024, 1024), 0.0), ("resnet", None, 0.9), ("gpt2", None, 0.9)]:
    for backend in ["sgd", "cupy", "triton"]:
        step, grads_only = make(wl_name, backend, mom, shape=shape)
        for _ in range(10): step()
        g = loop_ms(grads_only, 50)
        s = loop_ms(step, 50); h = host_ms(step, 50)
        print(f"== {wl_name} {backend}: step {s:.3f} ms (incl set_grads {g:.3f}), host {h:.3f} ms", flush=True)
        if backend == "sgd":
            continue
        # syncs with where they come from
        torch.cuda.synchronize(); old = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always"); torch.cuda.set_sync_debug_mode("warn")
            try: step()
            finally: torch.cuda.set_sync_debug_mode(old)
        locs = collections.Counter(f"{w.filename.split('/')[-1]}:{w.lineno}" for w in caught if "prototype" not in str(w.message))
        print("   syncs:", dict(locs))
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(); torch.cuda.synchronize()
        ev = prof.events()
        kern = [e for e in ev if e.device_type == torch.autograd.DeviceType.CUDA]
        api = collections.Counter(e.name for e in ev if e.name.startswith(("cuda", "cu")) and e.device_type != torch.autograd.DeviceType.CUDA)
        ops = collections.Counter(e.name for e in ev if e.name.startswith("aten::"))
        print(f"   kernels {len(kern)}  device {sum(e.device_time for e in kern)/1e3:.3f} ms  api {dict(api.most_common(8))}")
        print("   aten top:", dict(ops.most_common(14)))
        pr = cProfile.Profile(); pr.enable()
        for _ in range(30): step()
        pr.disable(); torch.cuda.synchronize()
        sio = io.StringIO(); st = pstats.Stats(pr, stream=sio); st.sort_stats("tottime").print_stats(22)
        lines = [l for l in sio.getvalue().splitlines() if l.strip()][-23:]
        print("\n".join("   " + l[:150] for l in lines))
        sio = io.StringIO(); st = pstats.Stats(pr, stream=sio); st.sort_stats("cumtime").print_stats(30)
        lines = [l for l in sio.getvalue().splitlines() if l.strip()][-31:]
        print("\n".join("   " + l[:150] for l in lines), flush=True)
