"""``lowrank demo``: SGD + weight decay minimise rank (Galanti et al., arXiv 2206.05794), every step.

Trains ReLU MLPs on scikit-learn's ``load_digits`` (shipped with scikit-learn, no download) with
:class:`lowrank.SpectralSGD` over a grid of batch size B, learning rate mu and weight decay lambda
(with a lambda = 0 control), tracking every weight matrix at every step. Then it

* checks the paper's four predictions automatically (lower rank with smaller B, with larger mu,
  with larger lambda; no rank collapse without weight decay) and says whether each held;
* audits the tracker: at a few checkpoints, exact ``torch.linalg.svdvals`` of every layer
  against the tracked estimates (largest error of the top singular values, and the tracked
  numerical rank, or its bounds when the rank exceeds the sketch, against the exact rank);
* writes a run folder: one RunLog per configuration (per-step Parquet), PNG plots, report.md,
  summary.json, and prints a summary table.

Protocol. Every configuration starts from the same initial weights and sees the same number of
training samples (``--equal epochs``, the default): a smaller batch therefore takes more steps.
This is the comparison behind the paper's bound: weight decay forgets old updates at a rate
(1 - mu*lambda) per step, so the memory of the weights spans about B / (mu*lambda) training
samples, each contributing a rank-one term to the gradient sum. ``--equal steps`` gives every
configuration the same number of steps instead.

Rank: the numerical rank of W / ||W||, i.e. the count of singular values above ``rank_tol``
(1e-3) times sigma_1. The tracker sees the top k = ``--sketch-rank`` values; a rank above k is
reported as the bounds the tracker gives (``numerical_rank`` .. ``numerical_rank_upper``), never
as a guess. The final checkpoint is always audited, so every final rank is also known exactly;
the checks use the exact final ranks and show the tracked values beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

RANK_TOL = 1e-3
# The tracker's stated accuracy (DESIGN.md section 3: the warm bi-iteration after ~20 steps,
# also while W moves): top-r singular values within 1e-3 of sigma_1. The audit checks this.
AUDIT_SIGMA_TOL = 1e-3
# "No rank collapse": every layer keeps at least this fraction of its initial rank.
NO_COLLAPSE_FRACTION = 0.9
N_FEATURES, N_CLASSES = 64, 10


# -- configuration ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    batch_size: int
    lr: float
    weight_decay: float
    steps: int
    epochs: float

    @property
    def id(self) -> str:
        return f"B{self.batch_size}_lr{self.lr:g}_wd{self.weight_decay:g}"

    @property
    def label(self) -> str:
        return f"B={self.batch_size} lr={self.lr:g} wd={self.weight_decay:g}"


@dataclass
class Settings:
    hidden: int
    depth: int
    batch_sizes: list
    lrs: list
    wds: list
    base: tuple  # (B, lr, wd) the axes meet at
    epochs: float
    steps: int | None
    equal: str
    full_grid: bool
    rank: int
    sketch_rank: int
    audits: int
    device: str
    backend: str
    seed: int
    workers: int
    out: Path
    quick: bool
    progress: bool = True
    n_train: int = 0
    configs: list = field(default_factory=list)


PRESETS = {
    # under half a minute on 2 CPU cores: the test runs this
    "quick": dict(hidden=128, depth=2, batch_sizes=[16, 64], lrs=[0.1, 0.2], wds=[0.0, 0.05],
                  base=(16, 0.2, 0.05), epochs=10.0, rank=20, sketch_rank=40, audits=3),
    # under 5 minutes on 2 CPU cores
    "default": dict(hidden=256, depth=3, batch_sizes=[8, 32, 128], lrs=[0.05, 0.1, 0.2],
                    wds=[0.0, 0.01, 0.02, 0.04], base=(32, 0.2, 0.04), epochs=30.0, rank=24,
                    sketch_rank=48, audits=4),
}


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowrank demo",
        description="Train ReLU MLPs on scikit-learn's digits with lowrank.SpectralSGD over a grid "
                    "of batch size, learning rate and weight decay; track the spectrum of every "
                    "weight matrix every step; check the predictions of Galanti et al. (SGD + "
                    "weight decay minimise rank) and audit the tracker against exact SVDs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model and grid, under half a minute on 2 CPU cores")
    p.add_argument("--hidden", type=int, default=None, help="hidden width (quick 128, default 256)")
    p.add_argument("--depth", type=int, default=None, help="number of hidden layers (quick 2, default 3)")
    p.add_argument("--batch-sizes", type=_ints, default=None, metavar="B,B,...")
    p.add_argument("--lrs", type=_floats, default=None, metavar="LR,LR,...")
    p.add_argument("--wds", type=_floats, default=None, metavar="WD,WD,...",
                   help="weight decays; 0 (the control) is added if missing")
    p.add_argument("--base", type=str, default=None, metavar="B,LR,WD",
                   help="where the three axes meet (default: the preset's)")
    p.add_argument("--full-grid", action="store_true",
                   help="every combination of the axes instead of one axis at a time through --base")
    p.add_argument("--epochs", type=float, default=None, help="training epochs of every configuration")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of the base configuration (overrides --epochs; others follow --equal)")
    p.add_argument("--equal", choices=("epochs", "steps"), default="epochs",
                   help="what configurations share: training samples (epochs) or steps")
    p.add_argument("--rank", type=int, default=None, help="singular values reported per matrix")
    p.add_argument("--sketch-rank", type=int, default=None,
                   help="sketch width k: ranks up to k are counted, larger ones bounded")
    p.add_argument("--audits", type=int, default=None,
                   help="audit checkpoints per configuration (exact svdvals), the last at the final step")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "torch", "triton", "cupy"),
                   help="tracking kernels (see lowrank.backends)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None,
                   help="configurations trained in parallel processes (CPU; default min(2, cores))")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default ./lowrank-runs/demo-<timestamp>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def settings_from_args(args) -> Settings:
    preset = dict(PRESETS["quick" if args.quick else "default"])
    for key in ("hidden", "depth", "batch_sizes", "lrs", "wds", "epochs", "rank", "sketch_rank",
                "audits"):
        value = getattr(args, key)
        if value is not None:
            preset[key] = value
    if args.base is not None:
        parts = args.base.split(",")
        if len(parts) != 3:
            raise SystemExit("lowrank demo: --base takes B,LR,WD")
        preset["base"] = (int(parts[0]), float(parts[1]), float(parts[2]))
    else:
        # keep the preset's base on the (possibly user-given) axes
        b, lr, wd = preset["base"]
        pick = lambda vals, v: v if v in vals else max(vals)  # noqa: E731
        wd_pos = [w for w in preset["wds"] if w > 0] or [wd]
        preset["base"] = (pick(preset["batch_sizes"], b), pick(preset["lrs"], lr), pick(wd_pos, wd))
    wds = sorted(set(preset["wds"]) | {0.0})
    if preset["sketch_rank"] is None or preset["sketch_rank"] < preset["rank"]:
        preset["sketch_rank"] = 2 * preset["rank"]
    workers = args.workers
    if workers is None:
        workers = 1 if str(args.device).startswith("cuda") else max(1, min(2, os.cpu_count() or 1))
    out = args.out or Path("lowrank-runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    s = Settings(hidden=preset["hidden"], depth=preset["depth"],
                 batch_sizes=sorted(set(preset["batch_sizes"])), lrs=sorted(set(preset["lrs"])),
                 wds=wds, base=tuple(preset["base"]), epochs=float(preset["epochs"]),
                 steps=args.steps, equal=args.equal, full_grid=args.full_grid,
                 rank=preset["rank"], sketch_rank=preset["sketch_rank"],
                 audits=max(1, preset["audits"]), device=args.device, backend=args.backend,
                 seed=args.seed, workers=workers, out=Path(out), quick=args.quick,
                 progress=not args.no_progress)
    for name, vals in (("batch sizes", s.batch_sizes), ("learning rates", s.lrs)):
        if not vals or min(vals) <= 0:
            raise SystemExit(f"lowrank demo: {name} must be positive")
    if min(s.wds) < 0:
        raise SystemExit("lowrank demo: weight decays must be >= 0")
    if s.hidden < 1 or s.depth < 1:
        raise SystemExit("lowrank demo: --hidden and --depth must be >= 1")
    return s


def make_grid(s: Settings, n_train: int) -> list[Config]:
    """The configurations: the three axes through the base point (or the full grid)."""
    b0, lr0, wd0 = s.base
    if s.full_grid:
        triples = [(b, lr, wd) for b in s.batch_sizes for lr in s.lrs for wd in s.wds]
    else:
        triples = ([(b, lr0, wd0) for b in s.batch_sizes] + [(b0, lr, wd0) for lr in s.lrs]
                   + [(b0, lr0, wd) for wd in s.wds])
    triples = list(dict.fromkeys(triples))
    configs = []
    for b, lr, wd in triples:
        if s.steps is not None:
            steps = s.steps if s.equal == "steps" else max(1, round(s.steps * b0 / b))
        else:
            steps = (max(1, round(s.epochs * n_train / b0)) if s.equal == "steps"
                     else max(1, round(s.epochs * n_train / b)))
        configs.append(Config(b, lr, wd, steps, steps * b / n_train))
    return configs


# -- data and model ---------------------------------------------------------------------------

def load_data(seed: int):
    """scikit-learn's digits (1797 8x8 images, shipped with the package), a stratified 80/20
    split, standardised with the training statistics. Returns numpy arrays."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    mean, std = Xtr.mean(0), Xtr.std(0) + 1e-6
    f32 = lambda a: ((a - mean) / std).astype(np.float32)  # noqa: E731
    return f32(Xtr), ytr.astype(np.int64), f32(Xte), yte.astype(np.int64)


def make_mlp(hidden: int, depth: int):
    import torch

    layers = OrderedDict()
    d = N_FEATURES
    for i in range(depth):
        layers[f"fc{i + 1}"] = torch.nn.Linear(d, hidden)
        layers[f"relu{i + 1}"] = torch.nn.ReLU()
        d = hidden
    layers["out"] = torch.nn.Linear(d, N_CLASSES)
    return torch.nn.Sequential(layers)


def make_optimizers(model, *, lr, weight_decay, rank, sketch_rank, backend, seed, log):
    """SpectralSGD over every parameter, every weight matrix tracked.

    SpectralSGD reports the same number of singular values for all its matrices and refuses a
    rank above min(m, n) of any of them (the 10 x hidden output layer caps it at 10). So the
    parameters are split by the rank each matrix can report, one optimizer per group, all with
    the same hyperparameters and the same log: together exactly one torch.optim.SGD step.
    """
    import lowrank

    named = list(model.named_parameters())
    cap = {}
    for name, p in named:
        if p.dim() >= 2:
            cap[name] = min(rank, p.shape[0], p[0].numel())
    top = max(cap.values())
    groups: dict[int, list] = {}
    for name, p in named:
        # a bias goes with its layer's weight
        r = cap.get(name, cap.get(name.rsplit(".", 1)[0] + ".weight", top))
        groups.setdefault(r, []).append((name, p))
    opts = []
    for r, params in sorted(groups.items(), reverse=True):
        opts.append(lowrank.SpectralSGD(params, lr=lr, weight_decay=weight_decay, rank=r,
                                        sketch_rank=max(sketch_rank, r), backend=backend,
                                        seed=seed, rank_tol=RANK_TOL, log=log))
    if log is not None:
        log.update_config({"tracked": {n: list(p.shape) for n, p in named if p.dim() >= 2},
                           "rank_by_matrix": cap, "sketch_rank": sketch_rank,
                           "optimizers": len(opts)})
    return opts


# -- the audit --------------------------------------------------------------------------------

def exact_rank(sv, tol: float = RANK_TOL) -> int:
    return int((sv > tol * sv[0]).sum()) if float(sv[0]) > 0 else 0


def audit_layer(name: str, W, res) -> dict:
    """Exact float64 svdvals of W against the tracked SpectrumResult ``res`` of the same step."""
    import torch

    exact = torch.linalg.svdvals(W.detach().reshape(W.shape[0], -1).to(torch.float64)).cpu()
    est = res.sigma.detach().cpu().to(torch.float64)
    r = est.shape[0]
    s1 = float(exact[0])
    err = (est - exact[:r]).abs()
    rank_x = exact_rank(exact)
    lo, hi = int(res.numerical_rank), int(res.numerical_rank_upper)
    censored = bool(res.rank_censored)
    fro2 = float(exact.square().sum())
    sr_exact = fro2 / s1 ** 2 if s1 > 0 else 0.0
    sr_est = float(res.stable_rank)
    # distance from the exact rank to the tracked value (uncensored) or interval (censored)
    miss = max(lo - rank_x, rank_x - hi, 0)
    return {
        "layer": layer_label(name), "param": name, "step": int(res.step), "shape": list(res.shape),
        "sigma_max_err": float((err / max(s1, 1e-300)).max()),  # relative to sigma_1
        "sigma_max_err_each": float((err / exact[:r].clamp_min(1e-300)).max()),
        "stable_rank_exact": sr_exact, "stable_rank_tracked": sr_est,
        "stable_rank_err": abs(sr_est - sr_exact) / max(sr_exact, 1e-300),
        "rank_exact": rank_x, "rank_tracked": lo, "rank_upper": hi, "rank_censored": censored,
        "rank_miss": miss, "convergence": float(res.convergence),
        "exact_sigma": exact.tolist(),
    }


def layer_label(name: str) -> str:
    """"fc2.weight" -> "fc2" for tables and plots."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def audit_steps(steps: int, n: int) -> list[int]:
    """n checkpoints spread over the run, the last at the final step (1-based update counts)."""
    return sorted({max(1, round(steps * (i + 1) / n)) for i in range(n)})


# -- training one configuration ---------------------------------------------------------------

_COUNTER = None  # shared progress counter of a worker process


def _init_worker(counter, threads):
    global _COUNTER
    _COUNTER = counter
    import torch

    torch.set_num_threads(threads)


def train_config(job: dict) -> dict:
    """Train one configuration; returns its results (plain Python, picklable)."""
    import numpy as np
    import torch

    import lowrank

    cfg = Config(**job["config"])
    s = job["settings"]
    device = torch.device(s["device"])
    Xtr, ytr, Xte, yte = (torch.as_tensor(a, device=device) for a in job["data"])
    n_train = Xtr.shape[0]
    torch.manual_seed(s["seed"])  # the same initial weights for every configuration
    model = make_mlp(s["hidden"], s["depth"]).to(device)
    run_dir = Path(job["run_dir"])
    log = lowrank.RunLog(run_dir, config={"demo_config": asdict(cfg), "id": cfg.id,
                                          "model": f"MLP {N_FEATURES}-" + "-".join([str(s["hidden"])] * s["depth"]) + f"-{N_CLASSES}",
                                          "data": "sklearn load_digits, 80/20 stratified split"},
                         flush_every=1000)
    opts = make_optimizers(model, lr=cfg.lr, weight_decay=cfg.weight_decay, rank=s["rank"],
                           sketch_rank=s["sketch_rank"], backend=s["backend"], seed=s["seed"],
                           log=log)
    weights = OrderedDict((n, p) for n, p in model.named_parameters() if p.dim() >= 2)
    init_ranks = {layer_label(n): exact_rank(torch.linalg.svdvals(p.detach().double()).cpu())
                  for n, p in weights.items()}
    checkpoints = audit_steps(cfg.steps, s["audits"])
    gen = torch.Generator(device="cpu").manual_seed(s["seed"] + 1)
    perm, pos = torch.randperm(n_train, generator=gen), 0
    losses = torch.empty(cfg.steps, dtype=torch.float32, device=device)
    audits, report_every, done = [], max(1, cfg.steps // 200), 0
    t0 = time.perf_counter()
    model.train()
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > n_train:  # drop the last partial batch, reshuffle
            perm, pos = torch.randperm(n_train, generator=gen), 0
        idx = perm[pos:pos + cfg.batch_size].to(device)
        pos += cfg.batch_size
        loss = torch.nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        losses[step - 1] = loss.detach()
        if step in checkpoints:
            spectra = {}
            for opt in opts:
                spectra.update(opt.spectra())
            audits.extend(audit_layer(n, W, spectra[n]) for n, W in weights.items())
        if step % report_every == 0 or step == cfg.steps:
            _tick(step - done)
            done = step
    train_seconds = time.perf_counter() - t0
    log.close()
    model.eval()
    with torch.no_grad():
        test_acc = float((model(Xte).argmax(1) == yte).float().mean())
        train_acc = float((model(Xtr).argmax(1) == ytr).float().mean())
    final = {}
    for opt in opts:
        final.update({n: r.as_dict() for n, r in opt.spectra().items()})
    loss_np = losses.cpu().numpy()
    np.save(run_dir / "train_loss.npy", loss_np)
    tail = loss_np[-max(1, min(len(loss_np), 50)):]
    return {"config": asdict(cfg), "id": cfg.id, "run_dir": str(run_dir), "test_acc": test_acc,
            "n_test": int(Xte.shape[0]),
            "train_acc": train_acc, "final_loss": float(tail.mean()), "init_ranks": init_ranks,
            "audits": audits, "final": final, "train_seconds": train_seconds,
            "ms_per_step": 1e3 * train_seconds / cfg.steps}


def _tick(n: int) -> None:
    if _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER.value += n
    elif _LOCAL_TICK is not None:
        _LOCAL_TICK(n)


_LOCAL_TICK = None


def run_all(s: Settings, data, configs: list[Config]) -> list[dict]:
    """Train every configuration (in ``s.workers`` processes on the CPU) with a progress bar."""
    global _LOCAL_TICK
    from tqdm import tqdm

    settings = {k: v for k, v in asdict(s).items() if k not in ("out", "configs")}
    jobs = [{"config": asdict(c), "settings": settings, "data": data,
             "run_dir": str(s.out / "runs" / c.id)} for c in configs]
    total = sum(c.steps for c in configs)
    tty = sys.stderr.isatty()
    bar = tqdm(total=total, desc=f"training {len(configs)} configurations", unit="step",
               disable=not s.progress, dynamic_ncols=True, file=sys.stderr,
               mininterval=0.2 if tty else 10.0)
    workers = min(s.workers, len(configs))
    # longest first, so the parallel workers finish together
    order = sorted(range(len(jobs)), key=lambda i: -configs[i].steps)
    results: dict[int, dict] = {}
    try:
        if workers <= 1:
            _LOCAL_TICK = bar.update
            for i in order:
                bar.set_postfix_str(configs[i].label, refresh=False)
                results[i] = train_config(jobs[i])
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            ctx = mp.get_context("spawn")  # no fork of a process that has started torch threads
            counter = ctx.Value("q", 0)
            threads = max(1, (os.cpu_count() or 1) // workers)
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=(counter, threads)) as pool:
                futures = {pool.submit(train_config, jobs[i]): i for i in order}
                pending = set(futures)
                while pending:
                    finished = [f for f in pending if f.done()]
                    for f in finished:
                        results[futures[f]] = f.result()
                        pending.discard(f)
                    bar.set_postfix_str(f"{len(results)}/{len(jobs)} configurations done",
                                        refresh=False)
                    bar.update(counter.value - bar.n)
                    if pending:
                        time.sleep(0.2)
            bar.update(total - bar.n)
    finally:
        _LOCAL_TICK = None
        bar.close()
    return [results[i] for i in range(len(jobs))]


# -- the four checks --------------------------------------------------------------------------

def final_ranks(result: dict) -> dict:
    """Per layer: the exact rank at the final step (audited) and the tracked value or bounds."""
    last = max(a["step"] for a in result["audits"])
    out = {}
    for a in result["audits"]:
        if a["step"] == last:
            out[a["layer"]] = {"exact": a["rank_exact"], "tracked": a["rank_tracked"],
                               "upper": a["rank_upper"], "censored": a["rank_censored"],
                               "stable_rank": a["stable_rank_tracked"]}
    return out


def tracked_text(fr: dict) -> str:
    if fr["censored"]:
        return f"{fr['tracked']}..{fr['upper']}"
    return str(fr["tracked"])


def _axis(results: list[dict], s: Settings, key: str) -> list[dict]:
    """The results along one axis through the base point, sorted by the axis value."""
    b0, lr0, wd0 = s.base
    fixed = {"batch_size": b0, "lr": lr0, "weight_decay": wd0}
    rows = [r for r in results
            if all(r["config"][k] == v for k, v in fixed.items() if k != key)]
    return sorted(rows, key=lambda r: r["config"][key])


def total_rank(result: dict) -> int:
    return sum(v["exact"] for v in final_ranks(result).values())


def _monotone_check(rows, key, *, increasing: bool, title: str, unit: str) -> dict:
    """Held when the total exact rank never goes the wrong way along the axis and the two ends
    differ in the predicted direction."""
    vals = [r["config"][key] for r in rows]
    ranks = [total_rank(r) for r in rows]
    per_layer = {}
    for r in rows:
        for layer, v in final_ranks(r).items():
            per_layer.setdefault(layer, []).append(v["exact"])
    if len(rows) < 2:
        return {"title": title, "held": None, "detail": f"needs 2 values of {unit} on the axis",
                "values": vals, "total_ranks": ranks, "per_layer": per_layer}
    pairs = list(zip(ranks, ranks[1:]))
    if increasing:
        ok = all(b >= a for a, b in pairs) and ranks[-1] > ranks[0]
    else:
        ok = all(b <= a for a, b in pairs) and ranks[-1] < ranks[0]
    seq = f"{ranks[0]} ({unit}={vals[0]:g})"
    for (a, b), v in zip(pairs, vals[1:]):
        seq += (" < " if b > a else " > " if b < a else " = ") + f"{b} ({unit}={v:g})"
    return {"title": title, "held": ok, "values": vals, "total_ranks": ranks,
            "per_layer": per_layer, "detail": f"total rank {seq}"}


def check_predictions(results: list[dict], s: Settings) -> list[dict]:
    b0, lr0, wd0 = s.base
    checks = []
    c = _monotone_check(_axis(results, s, "batch_size"), "batch_size", increasing=True,
                        title="lower rank with smaller batch size", unit="B")
    c["where"] = f"lr={lr0:g}, wd={wd0:g}"
    checks.append(c)
    c = _monotone_check(_axis(results, s, "lr"), "lr", increasing=False,
                        title="lower rank with larger learning rate", unit="lr")
    c["where"] = f"B={b0}, wd={wd0:g}"
    checks.append(c)
    c = _monotone_check(_axis(results, s, "weight_decay"), "weight_decay", increasing=False,
                        title="lower rank with larger weight decay", unit="wd")
    c["where"] = f"B={b0}, lr={lr0:g}"
    checks.append(c)
    # no collapse without weight decay
    controls = [r for r in results if r["config"]["weight_decay"] == 0]
    worst, parts = 1.0, []
    for r in controls:
        fr = final_ranks(r)
        for layer, v in fr.items():
            init = r["init_ranks"][layer]
            frac = v["exact"] / init if init else 1.0
            worst = min(worst, frac)
        parts.append(f"B={r['config']['batch_size']} lr={r['config']['lr']:g}: "
                     + ", ".join(f"{layer} {v['exact']}/{r['init_ranks'][layer]}"
                                 for layer, v in fr.items()))
    decayed = [r for r in results if r["config"]["weight_decay"] > 0]
    lowest = min(decayed, key=total_rank) if decayed else None
    detail = ("wd=0 keeps at least " + f"{worst:.1%}" + " of the initial rank (final/initial: "
              + "; ".join(parts) + ")")
    if lowest is not None:
        fr = final_ranks(lowest)
        detail += (f"; with weight decay, {Config(**lowest['config']).label} ends at "
                   + ", ".join(f"{layer} {v['exact']}/{lowest['init_ranks'][layer]}"
                               for layer, v in fr.items()))
    checks.append({"title": "no rank collapse without weight decay",
                   "held": (worst >= NO_COLLAPSE_FRACTION) if controls else None,
                   "where": f"every layer keeps >= {NO_COLLAPSE_FRACTION:.0%} of its initial rank",
                   "detail": detail, "min_fraction": worst})
    return checks


def summarize_audit(results: list[dict]) -> dict:
    audits = [dict(a, config=r["id"]) for r in results for a in r["audits"]]
    worst = max(audits, key=lambda a: a["sigma_max_err"])
    worst_sr = max(audits, key=lambda a: a["stable_rank_err"])
    uncensored = [a for a in audits if not a["rank_censored"]]
    rank_exact = sum(a["rank_miss"] == 0 for a in audits)
    worst_rank = max(audits, key=lambda a: a["rank_miss"])
    return {
        "n": len(audits), "tol": AUDIT_SIGMA_TOL,
        "sigma_max_err": worst["sigma_max_err"], "worst": {k: worst[k] for k in (
            "config", "layer", "step", "sigma_max_err", "sigma_max_err_each", "convergence")},
        "sigma_passed": worst["sigma_max_err"] <= AUDIT_SIGMA_TOL,
        "stable_rank_max_err": worst_sr["stable_rank_err"],
        "rank_agree": rank_exact, "rank_uncensored": len(uncensored),
        "rank_censored": len(audits) - len(uncensored),
        "rank_max_miss": worst_rank["rank_miss"],
        "worst_rank": {k: worst_rank[k] for k in ("config", "layer", "step", "rank_exact",
                                                  "rank_tracked", "rank_upper", "rank_censored")},
        "passed": worst["sigma_max_err"] <= AUDIT_SIGMA_TOL,
    }


# -- output -----------------------------------------------------------------------------------

def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def summary_table(results: list[dict]) -> str:
    layers = list(final_ranks(results[0]))
    header = ["config", "steps", "epochs", "test acc", "rank " + "/".join(layers) + " (exact)",
              "tracked", "stable rank"]
    rows = []
    for r in results:
        fr = final_ranks(r)
        c = r["config"]
        rows.append([Config(**c).label, str(c["steps"]), f"{c['epochs']:.1f}",
                     f"{r['test_acc']:.3f}", "/".join(str(fr[l]["exact"]) for l in layers),
                     "/".join(tracked_text(fr[l]) for l in layers),
                     "/".join(f"{fr[l]['stable_rank']:.1f}" for l in layers)])
    return _table(rows, header)


def checks_text(checks: list[dict]) -> str:
    out = []
    for i, c in enumerate(checks, 1):
        verdict = {True: "HELD", False: "DID NOT HOLD", None: "NOT TESTED"}[c["held"]]
        out.append(f"  {i}. {c['title']} [{c['where']}]: {verdict}\n     {c['detail']}")
    return "\n".join(out)


def audit_text(a: dict) -> str:
    w = a["worst"]
    verdict = "PASSED" if a["passed"] else "FAILED"
    wr = a["worst_rank"]
    rank_line = (f"numerical rank: {a['rank_agree']}/{a['n']} audits agree with the exact rank "
                 f"({a['rank_censored']} of them censored at k, where the exact rank lies in the "
                 "tracked bounds)")
    if a["rank_max_miss"]:
        rank_line += (f"; largest miss {a['rank_max_miss']} ({wr['config']} {wr['layer']} step "
                      f"{wr['step']}: exact {wr['rank_exact']}, tracked {wr['rank_tracked']}"
                      + (f"..{wr['rank_upper']}" if wr["rank_censored"] else "") + ")")
    return (f"audit {verdict}: {a['n']} exact svdvals; largest error of the top singular values "
            f"{a['sigma_max_err']:.2e} of sigma_1 (tolerance {a['tol']:.0e}) at {w['config']} "
            f"{w['layer']} step {w['step']}\n  {rank_line}\n  stable rank: largest relative "
            f"error {a['stable_rank_max_err']:.2e}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    t_start = time.perf_counter()
    try:
        import matplotlib  # noqa: F401
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        print(f"lowrank demo needs the demo extras ({exc.name} is missing): "
              "pip install 'lowrank-spectra[demo]'", file=sys.stderr)
        return 2
    import torch

    if s.device.startswith("cuda") and not torch.cuda.is_available():
        print("lowrank demo: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    from . import backends

    try:
        backends.resolve_backend(s.backend, torch.device(s.device))
    except (backends.BackendUnavailable, ValueError) as exc:
        print(f"lowrank demo: {exc}", file=sys.stderr)
        return 2
    data = load_data(s.seed)
    s.n_train = len(data[0])
    configs = make_grid(s, s.n_train)
    s.configs = [asdict(c) for c in configs]
    if s.out.exists() and any(s.out.iterdir()):
        print(f"lowrank demo: {s.out} exists and is not empty; choose another --out", file=sys.stderr)
        return 2
    s.out.mkdir(parents=True, exist_ok=True)
    print(f"lowrank demo: MLP {N_FEATURES}-{'-'.join([str(s.hidden)] * s.depth)}-{N_CLASSES} "
          f"(ReLU) on digits ({s.n_train} train / {len(data[2])} test), {len(configs)} "
          f"configurations, {sum(c.steps for c in configs)} steps, every weight matrix tracked "
          f"every step (k={s.sketch_rank}), {s.device}, {s.workers} worker(s)\n  -> {s.out}",
          flush=True)
    results = run_all(s, data, configs)
    train_wall = time.perf_counter() - t_start
    checks = check_predictions(results, s)
    audit = summarize_audit(results)
    from .demo_plots import write_plots, write_report

    plots = write_plots(s, results)
    wall = time.perf_counter() - t_start
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()},
               "results": [{k: v for k, v in r.items() if k != "final"} for r in results],
               "checks": checks, "audit": audit, "wall_seconds": wall,
               "train_wall_seconds": train_wall, "plots": [str(p.name) for p in plots],
               "rank_tol": RANK_TOL}
    (s.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    write_report(s, results, checks, audit, plots, wall)
    table = summary_table(results)
    print()
    print(table)
    print(f"\nrank = numerical rank of W/||W|| at tol {RANK_TOL:g}, exact at the final step; "
          f"tracked = the tracker's count (a..b: bounds where the rank exceeds k={s.sketch_rank})")
    print("\nthe paper's predictions (Galanti et al., arXiv 2206.05794):")
    print(checks_text(checks))
    print("\n" + audit_text(audit))
    print(f"\nwall time {wall:.1f} s; report: {s.out / 'report.md'}")
    return 0 if audit["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
