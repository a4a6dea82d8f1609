"""Workloads: initial weights, the gradient each step, and which matrices are tracked.

Synthetic workloads ("matrix", "mlp", "gpt2", "resnet") need no forward or backward pass: every
weight matrix starts with a known kind of spectrum and random gradients are set on ``.grad``.

* Spectrum of every synthetic matrix: a head of ``HEAD`` singular values decaying geometrically
  (sigma_i = DECAY**i, i < HEAD), then a gap down to a Gaussian tail of spectral norm ``TAIL``.
* Gradients: two Gaussian tensors G0, G1 per parameter with the RMS of the parameter, applied in
  the cycle G0, G1, -G0, -G1. With ``lr = MOVE`` each SGD step moves a weight by MOVE times its
  Frobenius norm, yet the cycle cancels, so the spectrum stays in place however many steps are
  timed. (With momentum the learning rate is scaled by 1 - momentum to move as much.)

"digits" is a real network: an MLP trained on the sklearn digits (8x8 images, in memory, nothing
cached to disk) for ``pretrain`` steps with SGD, after which each provider continues training it
with real minibatch gradients (computed outside the timed step).

The tracked set of a workload is every parameter with >= 2 dims whose matrix view has
min(m, n) >= k for every k of the group, so all providers of a group track the same matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

HEAD = 64
DECAY = 0.95
TAIL = 0.01
MOVE = 1e-2


@dataclass
class Workload:
    name: str  # "matrix", "mlp", "gpt2", "resnet", "digits"
    label: str  # shape or model description for tables, e.g. "1024x1024", "gpt2 d256 L4"
    params: list  # (name, tensor) initial weights on the device, in the workload dtype
    set_grads: Callable  # set_grads(list_of_params in the order of `params`, step) -> None
    lr: float  # SGD learning rate (already scaled for momentum)
    lr_adamw: float
    spectrum: str  # "synthetic" or "trained"
    extra: dict = field(default_factory=dict)

    def tracked(self, ks) -> list[str]:
        kmax = max(ks)
        out = []
        for name, p in self.params:
            if p.dim() >= 2 and min(p.shape[0], p[0].numel()) >= kmax:
                out.append(name)
        return out

    def numel(self) -> int:
        return sum(p.numel() for _, p in self.params)


def synthetic_matrix(m: int, n: int, *, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """(m, n) matrix with a geometric head of singular values, a gap, and a Gaussian tail."""
    h = min(HEAD, m, n)
    U = torch.linalg.qr(torch.randn(m, h, generator=gen, device=device)).Q
    V = torch.linalg.qr(torch.randn(n, h, generator=gen, device=device)).Q
    s = DECAY ** torch.arange(h, device=device, dtype=torch.float32)
    W = (U * s) @ V.T
    W += torch.randn(m, n, generator=gen, device=device) * (TAIL / (math.sqrt(m) + math.sqrt(n)))
    return W.to(dtype)


def _rms(t: torch.Tensor) -> float:
    return float(t.float().square().mean().sqrt()) if t.numel() else 0.0


def _random_grad_pool(params, gen, device):
    pool = []
    for _, p in params:
        scale = _rms(p) or 1.0
        g0 = (torch.randn(p.shape, generator=gen, device=device) * scale).to(p.dtype)
        g1 = (torch.randn(p.shape, generator=gen, device=device) * scale).to(p.dtype)
        pool.append((g0, g1, -g0, -g1))
    return pool


def _synthetic(name, label, layout, *, device, dtype, momentum, seed) -> Workload:
    """``layout``: (param name, shape, kind) with kind "matrix" | "zeros" | "ones"."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for pname, shape, kind in layout:
        if kind == "matrix":
            m, n = shape[0], math.prod(shape[1:])
            W = synthetic_matrix(m, n, gen=gen, device=device, dtype=dtype).reshape(shape)
        elif kind == "zeros":
            W = torch.zeros(shape, device=device, dtype=dtype)
        else:
            W = torch.ones(shape, device=device, dtype=dtype)
        params.append((pname, W))
    pool = _random_grad_pool(params, gen, device)

    def set_grads(ps, step):
        j = step % 4
        for p, grads in zip(ps, pool):
            p.grad = grads[j]

    # Adam's step is about lr per element: this lr moves a matrix by ~MOVE of its norm too.
    mats = [W for _, W in params if W.dim() >= 2]
    lr_adamw = MOVE * sum(_rms(W) for W in mats) / max(len(mats), 1)
    return Workload(name, label, params, set_grads, lr=MOVE * (1 - momentum),
                    lr_adamw=lr_adamw, spectrum="synthetic")


def matrix(m: int, n: int | None = None, **kw) -> Workload:
    n = m if n is None else n
    return _synthetic("matrix", f"{m}x{n}", [("weight", (m, n), "matrix")], **kw)


def mlp_layout(widths):
    out = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        out += [(f"fc{i}.weight", (b, a), "matrix"), (f"fc{i}.bias", (b,), "zeros")]
    return out


def gpt2_layout(d: int, layers: int, vocab: int, ctx: int):
    """Parameter shapes of GPT-2 (nn.Linear convention (out, in); the LM head is tied)."""
    out = [("wte", (vocab, d), "matrix"), ("wpe", (ctx, d), "matrix")]
    for i in range(layers):
        h = f"h{i}."
        out += [(h + "ln1.weight", (d,), "ones"), (h + "ln1.bias", (d,), "zeros"),
                (h + "attn.c_attn.weight", (3 * d, d), "matrix"), (h + "attn.c_attn.bias", (3 * d,), "zeros"),
                (h + "attn.c_proj.weight", (d, d), "matrix"), (h + "attn.c_proj.bias", (d,), "zeros"),
                (h + "ln2.weight", (d,), "ones"), (h + "ln2.bias", (d,), "zeros"),
                (h + "mlp.c_fc.weight", (4 * d, d), "matrix"), (h + "mlp.c_fc.bias", (4 * d,), "zeros"),
                (h + "mlp.c_proj.weight", (d, 4 * d), "matrix"), (h + "mlp.c_proj.bias", (d,), "zeros")]
    return out + [("ln_f.weight", (d,), "ones"), ("ln_f.bias", (d,), "zeros")]


def resnet18_layout(width: int = 64, classes: int = 1000):
    """Parameter shapes of ResNet-18 (convs without bias, batch-norm weight and bias)."""
    out = []

    def conv(name, o, i, k):
        out.append((name + ".weight", (o, i, k, k), "matrix"))
        out.append((name + ".bn.weight", (o,), "ones"))
        out.append((name + ".bn.bias", (o,), "zeros"))

    conv("conv1", width, 3, 7)
    cin = width
    for stage, mult in enumerate((1, 2, 4, 8)):
        c = width * mult
        for block in range(2):
            pre = f"layer{stage + 1}.{block}"
            conv(pre + ".conv1", c, cin, 3)
            conv(pre + ".conv2", c, c, 3)
            if cin != c:
                conv(pre + ".downsample", c, cin, 1)
            cin = c
    return out + [("fc.weight", (classes, cin), "matrix"), ("fc.bias", (classes,), "zeros")]


MODELS = {
    # name: (cpu layout and label, cuda layout and label)
    "mlp": ((mlp_layout([784, 1024, 1024, 1024, 10]), "mlp 784-1024-1024-1024-10"),
            (mlp_layout([1024, 4096, 4096, 4096, 1024]), "mlp 1024-4096-4096-4096-1024")),
    "gpt2": ((gpt2_layout(256, 4, 4096, 256), "gpt2 d256 L4 V4096"),
             (gpt2_layout(768, 12, 50257, 1024), "gpt2-small d768 L12 V50257")),
    "gpt2-tiny": ((gpt2_layout(128, 2, 1024, 128), "gpt2 d128 L2 V1024"),
                  (gpt2_layout(128, 2, 1024, 128), "gpt2 d128 L2 V1024")),
    "resnet": ((resnet18_layout(32, 100), "resnet18 width 32"),
               (resnet18_layout(64, 1000), "resnet18")),
}


def model(name: str, *, device, **kw) -> Workload:
    cpu, cuda = MODELS[name]
    layout, label = cuda if torch.device(device).type == "cuda" else cpu
    return _synthetic(name, label, layout, device=device, **kw)


def digits(*, device, dtype=torch.float32, momentum=0.9, seed=0, pretrain=200, hidden=256,
           batch=64) -> Workload:
    """An MLP 64-hidden-hidden-10 trained on sklearn digits; gradients from real minibatches."""
    from sklearn.datasets import load_digits

    device = torch.device(device)
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    X = ((X - X.mean(0)) / (X.std(0) + 1e-6)).to(device)
    y = torch.tensor(y, dtype=torch.long, device=device)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 10)).to(device)
    names = ["fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batches = [torch.randint(0, len(y), (batch,), generator=gen).to(device) for _ in range(64)]
    lr = 0.05 if momentum else 0.5

    def loss_of(ps, step):
        idx = batches[step % len(batches)]
        h = X[idx].to(ps[0].dtype)
        for i in range(0, 6, 2):
            h = torch.nn.functional.linear(h, ps[i], ps[i + 1])
            if i < 4:
                h = torch.relu(h)
        return torch.nn.functional.cross_entropy(h.float(), y[idx])

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    ps = list(net.parameters())
    for step in range(pretrain):
        opt.zero_grad()
        loss_of(ps, step).backward()
        opt.step()
    with torch.no_grad():
        h = X
        for i in range(0, 6, 2):
            h = torch.nn.functional.linear(h, ps[i], ps[i + 1])
            h = torch.relu(h) if i < 4 else h
        accuracy = float((h.argmax(1) == y).float().mean())
    params = [(n, p.detach().to(dtype).clone()) for n, p in zip(names, ps)]

    def set_grads(ps_, step):
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(ps_, pretrain + step), ps_)
        for p, g in zip(ps_, grads):
            p.grad = g

    return Workload("digits", f"digits mlp 64-{hidden}-{hidden}-10", params, set_grads, lr=lr,
                    lr_adamw=1e-3, spectrum="trained",
                    extra={"pretrain_steps": pretrain, "train_accuracy": accuracy})


def build(name: str, *, device, dtype, momentum, seed=0, shape=None, pretrain=200) -> Workload:
    """Workload by name: "matrix" (``shape`` (m, n)), a model of :data:`MODELS`, or "digits"."""
    if name == "matrix":
        return matrix(*shape, device=device, dtype=dtype, momentum=momentum, seed=seed)
    if name == "digits":
        return digits(device=device, dtype=dtype, momentum=momentum, seed=seed, pretrain=pretrain)
    return model(name, device=device, dtype=dtype, momentum=momentum, seed=seed)
