"""Benchmark workloads and the implementations compared on them.

Used by compare.py (the interleaved comparison table) and test_bench.py (pytest-benchmark).

Model workloads (a loss at K points of a line or plane of weight space, over a data set):
  W1  MNIST MLP 784-1024-1024-10, a line, K points, batches of 1,000 examples
  W2  CIFAR ResNet-20 with batch norm, a line, bn="recompute" (update_bn per point)
  W3  a ~300M-parameter decoder-only transformer, a line (merge-ratio sweep), K = 16 points,
      next-token loss on 1 sequence × 8 tokens per point on the CPU, 4 × 64 on a GPU
  W5  a 21×21 plane on W1's model
Every implementation returns the (K,) float64 mean loss at the workload's coords.

Op workload:
  W4  mlifast.ops.multipoint_linear swept over K points × R rows per point, 1024×1024.

Sizes come in three presets: "full" (compare.py), "quick" (compare.py --quick, the CI
correctness smoke test) and "tiny" (test_bench.py). Build a workload with
make_workload(name, preset, device): W3's batch shape depends on the device.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

import mlifast
from bench_models import ResNet20, mnist_mlp

# ----------------------------------------------------------------------------- sizes

SIZES = {
    # W1: points, examples, batch. W2: points, examples, batch, width. W5: grid side, examples, batch.
    # W3: points; the transformer (width, layers, heads, vocab, context); tokens per point as
    # (sequences, tokens per sequence) on each device — every linear layer sees
    # sequences × tokens rows per point (8 on the CPU, 256 on a GPU).
    "full": {
        "W1": dict(points=50, examples=10_000, batch=1_000),
        "W2": dict(points=50, examples=64, batch=64, width=16),  # 10,000 would take hours on 2 cores
        "W3": dict(points=16, width=1024, layers=24, heads=16, vocab=8192, context=64,
                   tokens=dict(cpu=(1, 8), cuda=(4, 64))),
        "W5": dict(side=21, examples=500, batch=500),
        "W4": dict(points=(1, 4, 16, 64), rows=(1, 8, 64, 256), features=1024,
                   shared_points=(16, 64), shared_rows=(64, 256)),
        "vmap_chunk": 10,
    },
    "quick": {
        "W1": dict(points=8, examples=400, batch=200),
        "W2": dict(points=4, examples=64, batch=32, width=8),
        "W3": dict(points=16, width=128, layers=2, heads=4, vocab=512, context=64,
                   tokens=dict(cpu=(1, 8), cuda=(4, 64))),
        "W5": dict(side=5, examples=200, batch=200),
        "W4": dict(points=(1, 16), rows=(1, 64), features=256, shared_points=(16,), shared_rows=(64,)),
        "vmap_chunk": 4,
    },
    "tiny": {
        "W1": dict(points=4, examples=64, batch=32),
        "W2": dict(points=3, examples=32, batch=16, width=4),
        "W3": dict(points=4, width=32, layers=1, heads=2, vocab=64, context=64,
                   tokens=dict(cpu=(1, 8), cuda=(4, 64))),
        "W5": dict(side=3, examples=64, batch=64),
        "W4": dict(points=(4,), rows=(8,), features=128, shared_points=(4,), shared_rows=(8,)),
        "vmap_chunk": 2,
    },
}

# ----------------------------------------------------------------------------- model workloads


@dataclass
class ModelWorkload:
    name: str
    title: str
    model: nn.Module  # an instance of the architecture at the space's origin; never modified
    endpoints: tuple  # the modules the space was built from (loss-landscapes takes these)
    space: mlifast.Span
    coords: Tensor  # (K, J) float64: the points every implementation evaluates
    data: list  # [(inputs, target)] batches
    bn: str  # "interpolate" or "recompute" (bn_data = data)
    vmap_chunk: int
    size_note: str
    loss_landscapes_order: Optional[Callable] = None  # maps its result to coords' order
    skipped: dict = field(default_factory=dict)  # implementation -> why it does not run here
    # loss(output, target, reduction=...) of one batch; every implementation sums it per example
    loss: Callable = F.cross_entropy
    peak_vs_weights: bool = False  # report peak memory in copies of the weights (W3)
    # device -> (data, size_note) where the batch shape depends on the device (W3); to_device uses it
    batches_for: Optional[Callable[[str], tuple]] = None

    @property
    def num_points(self) -> int:
        return self.coords.shape[0]

    @property
    def num_examples(self) -> int:
        return sum(int(y.shape[0]) for _, y in self.data)

    @property
    def weight_bytes(self) -> int:
        """Bytes of one copy of the model's floating-point state (what a loop holds per model)."""
        return sum(t.numel() * t.element_size() for t in self.space.origin.values() if t.is_floating_point())


def _batches(x: Tensor, y: Tensor, batch: int) -> list:
    return [(x[i : i + batch].contiguous(), y[i : i + batch].contiguous()) for i in range(0, x.shape[0], batch)]


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Give every batch norm its own affine parameters and running statistics, as a trained
    network has (fresh inits all share weight 1, bias 0, mean 0, var 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def line_coords_loss_landscapes(k: int) -> Tensor:
    """The α that loss_landscapes.linear_interpolation(steps=k) evaluates: start + i·(end−start)/k
    for i = 1..k (α = 0 is never evaluated)."""
    return (torch.arange(1, k + 1, dtype=torch.float64) / k).unsqueeze(1)


def plane_coords_loss_landscapes(n: int) -> tuple[Tensor, Callable]:
    """The points loss_landscapes.planar_interpolation(steps=n) evaluates, and a map from its
    (n, n) result to that order. It snakes through the grid with in-place add_/sub_: column
    i (a = i/n, i = 0..n−1) has b = 1/n..1 when i is even but b = 0..(n−1)/n when i is odd."""
    coords, order = [], []
    for i in range(n):
        js = range(1, n + 1) if i % 2 == 0 else range(0, n)
        for pos, j in enumerate(js):
            coords.append((i / n, j / n))
            order.append((i, pos))
    rows = torch.tensor([i for i, _ in order])
    cols = torch.tensor([p for _, p in order])
    return torch.tensor(coords, dtype=torch.float64), lambda matrix: torch.as_tensor(matrix)[rows, cols]


def make_w1(preset: str = "full", device: str = "cpu") -> ModelWorkload:
    s = SIZES[preset]["W1"]
    torch.manual_seed(1)
    start, end = mnist_mlp(), mnist_mlp()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(s["examples"], 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (s["examples"],), generator=g)
    return ModelWorkload(
        "W1", "MNIST MLP 784-1024-1024-10, line", copy.deepcopy(start).eval(), (start.eval(), end.eval()),
        mlifast.Line(start, end), line_coords_loss_landscapes(s["points"]), _batches(x, y, s["batch"]),
        "interpolate", SIZES[preset]["vmap_chunk"],
        f"K={s['points']}, {s['examples']} ex, batch {s['batch']}",
    )


def make_w2(preset: str = "full", device: str = "cpu") -> ModelWorkload:
    s = SIZES[preset]["W2"]
    torch.manual_seed(2)
    start = _randomize_bn(ResNet20(width=s["width"]), 21)
    end = _randomize_bn(ResNet20(width=s["width"]), 22)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(s["examples"], 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (s["examples"],), generator=g)
    wl = ModelWorkload(
        "W2", f"CIFAR ResNet-20 (width {s['width']}) + BN, line, bn=recompute", copy.deepcopy(start).eval(),
        (start.eval(), end.eval()), mlifast.Line(start, end), line_coords_loss_landscapes(s["points"]),
        _batches(x, y, s["batch"]), "recompute", SIZES[preset]["vmap_chunk"],
        f"K={s['points']}, {s['examples']} ex, batch {s['batch']}",
    )
    wl.skipped["loss-landscapes"] = (
        "moves parameters only (BN running statistics stay at the start model's) and never "
        "recomputes them: it cannot express bn=recompute"
    )
    wl.skipped["loop-foreach"] = "same as loop (update_bn dominates); not run to save time"
    return wl


def make_w5(preset: str = "full", device: str = "cpu") -> ModelWorkload:
    s = SIZES[preset]["W5"]
    torch.manual_seed(5)
    p0, p1, p2 = mnist_mlp(), mnist_mlp(), mnist_mlp()
    g = torch.Generator().manual_seed(15)
    x = torch.randn(s["examples"], 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (s["examples"],), generator=g)
    coords, order = plane_coords_loss_landscapes(s["side"])
    return ModelWorkload(
        "W5", f"MNIST MLP, {s['side']}×{s['side']} plane", copy.deepcopy(p0).eval(), (p0.eval(), p1.eval(), p2.eval()),
        mlifast.Plane.through(p0, p1, p2), coords, _batches(x, y, s["batch"]), "interpolate",
        SIZES[preset]["vmap_chunk"], f"K={s['side']}²={s['side']**2}, {s['examples']} ex, batch {s['batch']}",
        loss_landscapes_order=order,
    )


# ----------------------------------------------------------------------------- W3: a decoder-only transformer


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with nn.Linear projections (one fused q/k/v)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # (N, T, E)
        n, t, e = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (N, H, T, E/H)
        return self.out(y.transpose(1, 2).reshape(n, t, e))


class DecoderBlock(nn.Module):
    """Pre-LN: x + attn(LN(x)), then x + MLP(LN(x)) with a 4× GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class DecoderLM(nn.Module):
    """A GPT-style decoder-only language model: token and learned position embeddings,
    pre-LN blocks, final LayerNorm, untied LM head. tokens (B, T) → logits (B, T, vocab)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(DecoderBlock(width, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: Tensor) -> Tensor:
        # nanoGPT's (T,) position ids: on the GPU T = 64 = K·B (16 points × 4 sequences),
        # which the first-call check resolves as the same for every example.
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.norm(self.blocks(self.tok(tokens) + self.pos(positions))))


def lm_loss(logits: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross entropy summed over each sequence's tokens: logits (N, T, V),
    target (N, T) → (N,) for reduction="none", their sum or mean otherwise."""
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    per_sequence = per_token.reshape(target.shape[0], -1).sum(1)
    if reduction == "none":
        return per_sequence
    return per_sequence.sum() if reduction == "sum" else per_sequence.mean()


def make_w3(preset: str = "full", device: str = "cpu") -> ModelWorkload:
    """A merge-ratio sweep between two independently initialised decoder-only transformers
    (~319M parameters at "full"): the memory-bound regime, few rows per point. On the CPU a
    batch is 1 sequence of 8 tokens (8 rows into every linear layer per point); on a GPU 4
    sequences of 64 tokens (256 rows). One batch; the loss is the next-token cross entropy
    summed over each sequence, averaged over sequences."""
    s = SIZES[preset]["W3"]
    arch = dict(vocab=s["vocab"], width=s["width"], layers=s["layers"], heads=s["heads"], context=s["context"])

    def batches_for(dev: str) -> tuple:
        """One batch of random tokens, its shape by device kind; targets are the next tokens."""
        sequences, length = s["tokens"]["cuda" if str(dev).startswith("cuda") else "cpu"]
        g = torch.Generator().manual_seed(13)
        tokens = torch.randint(0, s["vocab"], (sequences, length + 1), generator=g)
        x, y = tokens[:, :-1].contiguous().to(dev), tokens[:, 1:].contiguous().to(dev)
        return [(x, y)], f"K={s['points']}, {sequences}×{length} tokens per point"

    torch.manual_seed(3)
    with torch.device(device):  # initialised on the device it runs on (~10 s on 2 CPU cores at full size)
        start, end = DecoderLM(**arch).eval(), DecoderLM(**arch).eval()
    params = sum(p.numel() for p in start.parameters())
    data, size_note = batches_for(device)
    return ModelWorkload(
        "W3", f"decoder-only transformer, {params / 1e6:.1f}M params (d={s['width']}, {s['layers']} layers, "
              f"vocab {s['vocab']}), line (merge-ratio sweep)",
        start, (start, end), mlifast.Line(start, end), line_coords_loss_landscapes(s["points"]), data,
        "interpolate", s["points"],  # vmap: all K points' weights stacked at once
        size_note, loss=lm_loss, peak_vs_weights=True, batches_for=batches_for,
    )


def _device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 2**62


def _vmap_memory_skip(wl: ModelWorkload) -> Optional[str]:
    """Why vmap cannot run on wl here, or None. vmap stacks every point of a chunk's whole
    state (chunk × the weights). Decided from the device's total memory (not what is free
    now) so that compare.py and its peak-memory subprocess agree; both hold the workload
    (its endpoints, the space's origin and directions) while one of them runs vmap."""
    device = next(iter(wl.space.origin.values())).device
    stacked = min(wl.vmap_chunk, wl.num_points) * wl.weight_bytes
    held = 2 * (len(wl.endpoints) + 1 + wl.space.num_directions) * wl.weight_bytes
    total = _device_memory_bytes(device)
    if stacked + held <= 0.8 * total:
        return None

    def gb(b: float) -> str:
        return f"{b / 1e9:.1f} GB"

    return (f"does not fit: the stacked state of {min(wl.vmap_chunk, wl.num_points)} points is {gb(stacked)}, "
            f"beside {gb(held)} of workload set-up (compare.py and its peak-memory process), "
            f"on a {device.type} with {gb(total)}; in chunks of a few points it would be a loop over chunks")


MODEL_WORKLOADS = {"W1": make_w1, "W2": make_w2, "W3": make_w3, "W5": make_w5}


def make_workload(name: str, preset: str = "full", device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> ModelWorkload:
    """Workload `name` at `preset`, with its models, space and data on `device`, their
    floating tensors in `dtype`."""
    return to_device(MODEL_WORKLOADS[name](preset, device=device), device, dtype)


def to_device(wl: ModelWorkload, device: str, dtype: torch.dtype = torch.float32) -> ModelWorkload:
    """The workload with its models, space and data on `device` and in `dtype` (coords
    stay on the CPU); a workload whose batch shape depends on the device (W3) gets that
    device's batches."""
    if wl.batches_for is not None:
        wl.data, wl.size_note = wl.batches_for(device)
    if device == "cpu" and dtype == torch.float32:
        return wl
    wl.model = wl.model.to(device, dtype)
    wl.endpoints = tuple(m.to(device, dtype) for m in wl.endpoints)
    wl.space = wl.space.to(device=device, dtype=dtype)
    wl.data = [(x.to(device, dtype) if x.is_floating_point() else x.to(device), y.to(device)) for x, y in wl.data]
    return wl


# ----------------------------------------------------------------------------- implementations


def _sum_loss(loss: Callable, output: Tensor, target: Tensor) -> float:
    return loss(output, target, reduction="sum").item()


def _update_bn(model: nn.Module, data) -> None:
    torch.optim.swa_utils.update_bn(data, model)  # reset statistics, one train-mode pass (momentum None)
    model.eval()


def run_mlifast(wl: ModelWorkload) -> Tensor:
    res = mlifast.evaluate(wl.model, wl.space, wl.data, coords=wl.coords, loss=wl.loss, metrics=(),
                           bn=wl.bn, progress=False)
    return res["loss"].to(torch.float64)


def run_loop_state_dict(wl: ModelWorkload, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """The careful user's loop: one model; per point load space.state_at(c), (for BN nets:
    update_bn, the paper's procedure), then every batch under no_grad. `memory_format`:
    that of the model's weights and inputs."""
    model = copy.deepcopy(wl.model).eval().to(memory_format=memory_format)
    data = [(x.contiguous(memory_format=memory_format), y) for x, y in wl.data]
    losses = []
    with torch.no_grad():
        for c in wl.coords:
            model.load_state_dict(wl.space.state_at(c))
            if wl.bn == "recompute":
                _update_bn(model, data)
            losses.append(sum(_sum_loss(wl.loss, model(x), y) for x, y in data))
    return torch.tensor(losses, dtype=torch.float64) / wl.num_examples


def run_loop_channels_last(wl: ModelWorkload) -> Tensor:
    """The loop with the model and its inputs in channels-last layout, as a user tuning a
    CNN for oneDNN on a CPU would run it (mlifast's convolutions use that layout there)."""
    return run_loop_state_dict(wl, torch.channels_last)


def run_loop_foreach(wl: ModelWorkload) -> Tensor:
    """The loop writing θ0 + Σ c_j·d_j into the model's tensors in place with _foreach ops."""
    model = copy.deepcopy(wl.model).eval()
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    keys = [k for k in wl.space.floating_keys if not wl.space.is_frozen(k)]
    targets = [live[k] for k in keys]
    origins = [wl.space.origin[k] for k in keys]
    dirs = [[wl.space.direction(k)[j] for k in keys] for j in range(wl.space.num_directions)]
    losses = []
    with torch.no_grad():
        for c in wl.coords.tolist():
            torch._foreach_copy_(targets, origins)
            for j, cj in enumerate(c):
                torch._foreach_add_(targets, dirs[j], alpha=cj)
            if wl.bn == "recompute":
                _update_bn(model, wl.data)
            losses.append(sum(_sum_loss(wl.loss, model(x), y) for x, y in wl.data))
    return torch.tensor(losses, dtype=torch.float64) / wl.num_examples


def run_vmap(wl: ModelWorkload) -> Tensor:
    """torch.func: stacked per-point state (chunks of `vmap_chunk` points, built as
    θ0 + C·D), functional_call under vmap, the inputs shared (in_dims None). For
    bn=recompute, per-point running statistics are rebuilt in a train-mode vmapped pass
    (momentum None, the shared num_batches_tracked unbatched), then an eval pass."""
    model = copy.deepcopy(wl.model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.momentum = None
    origin = wl.space.origin
    device = next(iter(origin.values())).device
    out = []

    def forward(state, x):
        return functional_call(model, state, (x,))

    with torch.no_grad():
        for start in range(0, wl.num_points, wl.vmap_chunk):
            c = wl.coords[start : start + wl.vmap_chunk].to(device=device, dtype=torch.float32)
            state, dims = {}, {}
            for k, o in origin.items():
                if o.is_floating_point():
                    d = wl.space.direction(k)
                    state[k] = (c.to(d.dtype) @ d.reshape(d.shape[0], -1)).reshape(c.shape[0], *o.shape).add_(o)
                    dims[k] = 0
                else:
                    state[k], dims[k] = o.clone(), None
            batched = vmap(forward, in_dims=(dims, None))
            if wl.bn == "recompute" and bns:
                for k in state:
                    if k.endswith("running_mean") or k.endswith("num_batches_tracked"):
                        state[k].zero_()
                    elif k.endswith("running_var"):
                        state[k].fill_(1.0)
                model.train()
                for x, _ in wl.data:
                    batched(state, x)
            model.eval()
            sums = torch.zeros(c.shape[0], dtype=torch.float64, device=device)
            for x, y in wl.data:
                logits = batched(state, x)  # (C, B, …)
                per = wl.loss(logits.flatten(0, 1), y.expand(c.shape[0], *y.shape).flatten(0, 1), reduction="none")
                sums += per.reshape(c.shape[0], -1).sum(1).double()
            out.append(sums)
    return torch.cat(out).cpu() / wl.num_examples


def loss_landscapes_available() -> Optional[str]:
    """None when the loss-landscapes package imports, else why not."""
    try:
        import loss_landscapes  # noqa: F401
        import loss_landscapes.metrics  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "skip, and say why"
        return f"loss-landscapes not importable: {type(e).__name__}: {e}"
    return None


def run_loss_landscapes(wl: ModelWorkload) -> Tensor:
    """loss_landscapes.linear_interpolation / planar_interpolation (pip loss-landscapes 3.0.6)
    with a Metric that sums the loss over every batch. deepcopy_model=True, as the start
    model is otherwise mutated in place."""
    import loss_landscapes
    from loss_landscapes.metrics import Metric

    data, n, loss = wl.data, wl.num_examples, wl.loss

    class DatasetLoss(Metric):
        def __call__(self, model_wrapper) -> float:
            with torch.no_grad():
                return sum(_sum_loss(loss, model_wrapper.forward(x), y) for x, y in data) / n

    models = wl.endpoints  # in eval mode; deep-copied by the package
    if isinstance(wl.space, mlifast.Plane):
        side = int(round(math.sqrt(wl.num_points)))
        grid = loss_landscapes.planar_interpolation(*models, DatasetLoss(), steps=side, deepcopy_model=True)
        return wl.loss_landscapes_order(grid).to(torch.float64)
    values = loss_landscapes.linear_interpolation(*models, DatasetLoss(), steps=wl.num_points, deepcopy_model=True)
    return torch.as_tensor(values, dtype=torch.float64)


MODEL_IMPLS: dict[str, Callable[[ModelWorkload], Tensor]] = {
    "mlifast": run_mlifast,
    "loop": run_loop_state_dict,
    "loop-foreach": run_loop_foreach,
    "loop-channels-last": run_loop_channels_last,
    "vmap": run_vmap,
    "loss-landscapes": run_loss_landscapes,
}
REFERENCE_IMPL = "loop"


def impls_for(wl: ModelWorkload) -> dict[str, Callable]:
    """The implementations that run on `wl` (see wl.skipped for the others)."""
    why = loss_landscapes_available()
    if why is not None:
        wl.skipped.setdefault("loss-landscapes", why)
    if not any(isinstance(m, nn.Conv2d) for m in wl.model.modules()):
        wl.skipped.setdefault("loop-channels-last", "no 2-d convolutions: the same as loop")
    why = _vmap_memory_skip(wl)
    if why is not None:
        wl.skipped.setdefault("vmap", why)
    return {name: fn for name, fn in MODEL_IMPLS.items() if name not in wl.skipped}


# ----------------------------------------------------------------------------- FLOP counts


def forward_flops(model: nn.Module, x: Tensor) -> tuple[int, int]:
    """(GEMM/conv FLOPs of one forward on x, those of the first layer with parameters)."""
    from torch.utils.flop_counter import FlopCounterMode

    first = {}

    def hook(module, inputs, _output):
        if "module" not in first:
            first["module"], first["inputs"] = module, inputs

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if next(m.parameters(recurse=False), None) is not None]
    model = model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as total:
            model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), FlopCounterMode(display=False) as head:
        first["module"](*first["inputs"])
    return total.get_total_flops(), head.get_total_flops()


def model_flops(wl: ModelWorkload) -> tuple[float, float]:
    """(useful FLOPs: K one-point forwards over the data — what a loop runs —, FLOPs of the
    fused algorithm: the first layer, whose input every point shares, on B rows for the
    origin and each direction, every other layer 1× per point). bn=recompute doubles both
    (a statistics pass and an evaluation pass)."""
    x = wl.data[0][0]
    per_batch, first = forward_flops(copy.deepcopy(wl.model), x)
    scale = wl.num_examples / x.shape[0]
    passes = 2 if wl.bn == "recompute" else 1
    k, j = wl.num_points, wl.space.num_directions
    useful = passes * k * per_batch * scale
    fused = passes * scale * ((j + 1) * first + k * (per_batch - first))
    return useful, fused


def model_bytes(wl: ModelWorkload) -> float:
    """Compulsory memory traffic of the fused algorithm: the origin and the J directions
    read once per batch (a pass holding every point; ×2 for bn=recompute's statistics pass)."""
    passes = 2 if wl.bn == "recompute" else 1
    return float(passes * len(wl.data) * (wl.space.num_directions + 1) * wl.weight_bytes)


# ----------------------------------------------------------------------------- W4: the fused op


@dataclass
class OpCase:
    points: int
    rows: int
    features: int
    x: Tensor  # (K, R, I), or (R, I) when every point sees the same rows (a first layer)
    weight: Tensor
    bias: Tensor
    dirs: Tensor  # (1, O, I)
    bias_dirs: Tensor  # (1, O)
    coeffs: Tensor  # (K, 1)

    @property
    def shared(self) -> bool:
        return self.x.dim() == 2

    @property
    def flops(self) -> float:
        """Useful FLOPs: K·R rows through a 1024² layer (what a per-point loop computes)."""
        return 2.0 * self.points * self.rows * self.features * self.features

    @property
    def fused_flops(self) -> float:
        """FLOPs of the fused algorithm: 1× per point, or for a shared input x·W0ᵀ and x·Dᵀ once."""
        return 4.0 * self.rows * self.features**2 if self.shared else self.flops

    @property
    def bytes(self) -> float:
        """Compulsory traffic of the fused op: W0 and D once, the input and the output."""
        f, kr = self.features, self.points * self.rows
        return 4.0 * (2 * f * f + (self.rows if self.shared else kr) * f + kr * f)


def make_op_case(points: int, rows: int, features: int, seed: int = 0, shared: bool = False) -> OpCase:
    g = torch.Generator().manual_seed(seed)
    f = features
    return OpCase(
        points, rows, f,
        torch.randn(*(() if shared else (points,)), rows, f, generator=g),
        torch.randn(f, f, generator=g) / math.sqrt(f),
        torch.randn(f, generator=g) * 0.1,
        torch.randn(1, f, f, generator=g) / math.sqrt(f),
        torch.randn(1, f, generator=g) * 0.1,
        torch.linspace(0, 1, points).unsqueeze(1),
    )


def op_case_to(c: OpCase, device: str) -> OpCase:
    if device == "cpu":
        return c
    return OpCase(c.points, c.rows, c.features, *(t.to(device) for t in
                  (c.x, c.weight, c.bias, c.dirs, c.bias_dirs, c.coeffs)))


def op_mlifast(c: OpCase) -> Tensor:
    return mlifast.ops.multipoint_linear(c.x, c.weight, c.bias, c.dirs, c.bias_dirs, c.coeffs)


def op_two_gemm(c: OpCase) -> Tensor:
    """x·W0ᵀ + b0 + c_k·(x·Dᵀ + db): two GEMMs over all K·R rows, then the per-point combine."""
    rows = c.x.reshape(-1, c.features)  # a shared input: R rows, computed once
    base = F.linear(rows, c.weight, c.bias).view(-1, c.rows, c.features)
    along = F.linear(rows, c.dirs[0], c.bias_dirs[0]).view(-1, c.rows, c.features)
    return torch.addcmul(base, c.coeffs.view(-1, 1, 1), along)


def op_loop_materialise(c: OpCase) -> Tensor:
    """Per point: W_k = W0 + c_k·D materialised, then one GEMM on that point's rows."""
    y = c.weight.new_empty(c.points, c.rows, c.features)
    for k, ck in enumerate(c.coeffs[:, 0].tolist()):
        w_k = torch.add(c.weight, c.dirs[0], alpha=ck)
        b_k = torch.add(c.bias, c.bias_dirs[0], alpha=ck)
        torch.addmm(b_k, c.x if c.shared else c.x[k], w_k.t(), out=y[k])
    return y


def op_dense_one_weight(c: OpCase) -> Tensor:
    """Not a competitor: one plain F.linear on the K·R rows with a single weight — the
    1×-FLOPs, one-weight-read cost that no multi-point method can beat."""
    return F.linear(c.x.reshape(-1, c.features), c.weight, c.bias)


def op_reference(c: OpCase) -> Tensor:
    """float64 h·(W0 + c_k·D)ᵀ + b_k, the oracle."""
    d = torch.float64
    w = c.weight.to(d) + c.coeffs.to(d).view(-1, 1, 1) * c.dirs.to(d)  # (K, O, I)
    b = c.bias.to(d) + c.coeffs.to(d) * c.bias_dirs.to(d)  # (K, O)
    return torch.matmul(c.x.to(d), w.transpose(1, 2)) + b.unsqueeze(1)


OP_IMPLS: dict[str, Callable[[OpCase], Tensor]] = {
    "mlifast": op_mlifast,
    "two-GEMM": op_two_gemm,
    "loop-materialise": op_loop_materialise,
    "dense-1W": op_dense_one_weight,
}
SHARED_OP_IMPLS = ("mlifast", "two-GEMM", "loop-materialise")  # dense-1W means nothing there
