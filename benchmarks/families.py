#!/usr/bin/env python
"""mlifast.evaluate against the careful user's loop on a range of model families.

    python benchmarks/families.py [--quick] [--families resnet18,gn,...] [--repeats 3] [--check-only]

Each case: a line between two seeded models of one family (norms' affine parameters and
batch norms' running statistics randomised, as trained networks have them), K points,
`mlifast.evaluate` against workloads.py's loop (per point `space.state_at(c)`, `update_bn`
for bn="recompute", every batch). First a check, the warm-up: every point's loss within
RTOL of the loop's, or the script exits non-zero naming the case (warnings show here).
Then (not with --quick or --check-only) both timed, --repeats rounds, the order alternating,
warnings silenced. Full sizes are the survey's (BENCHMARKS.md): K = 16, 32–512 examples;
quick sizes take seconds in all (test_bench.py checks them).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mlifast  # noqa: E402
import compare as C  # noqa: E402
import workloads as W  # noqa: E402

RTOL = 1e-5  # float32: the largest relative difference of a point's loss from the loop's
IMPLS = {"mlifast": W.run_mlifast, "loop": W.run_loop_state_dict}

# ----------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    """ResNet-18's block on (N, cin, H, W): two 3×3 conv + BN, ReLU after + the input (1×1 conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x if self.down is None else self.down(x)
        return self.relu(out)


def resnet18(width: int = 64, classes: int = 100) -> nn.Module:
    """ImageNet-layout ResNet-18 on images (N, 3, H, W), basic blocks of width·(1, 2, 4, 8) channels."""
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    for i in range(4):
        layers += [BasicBlock(width << max(i - 1, 0), width << i, 2 if i else 1), BasicBlock(width << i, width << i, 1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width << 3, classes))


class InvertedResidual(nn.Module):
    """MobileNetV2's block on (N, cin, H, W): 1×1 expand, 3×3 depthwise, 1×1 project, + the input."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int, act: type) -> None:
        super().__init__()
        hid = cin * expand
        expansion = [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), act()] if expand != 1 else []
        self.conv = nn.Sequential(*expansion, nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
                                  nn.BatchNorm2d(hid), act(), nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet(width: float = 0.5, act: str = "relu6", classes: int = 100) -> nn.Module:
    """MobileNetV2 on images (N, 3, H, W), width multiplier ≤ 1, ReLU6 or V3's Hardswish ("hswish")."""
    act = {"relu6": nn.ReLU6, "hswish": nn.Hardswish}[act]
    cin, last = max(8, int(32 * width + 4) // 8 * 8), int(1280 * max(width, 0.5))
    layers = [nn.Conv2d(3, cin, 3, 2, 1, bias=False), nn.BatchNorm2d(cin), act()]
    for expand, channels, blocks, stride in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                                             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        cout = max(8, int(channels * width + 4) // 8 * 8)
        for i in range(blocks):
            layers.append(InvertedResidual(cin if i == 0 else cout, cout, stride if i == 0 else 1, expand, act))
        cin = cout
    return nn.Sequential(*layers, nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), act(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, classes))


class Block(nn.Module):
    """Pre-LN transformer block on (N, T, dim): timm's qkv + SDPA (attn="sdpa") or nn.MultiheadAttention."""

    def __init__(self, dim: int, heads: int, attn: str) -> None:
        super().__init__()
        self.heads, self.ln1, self.ln2 = heads, nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True) if attn == "mha" else None
        if self.mha is None:
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.ln1(x)
        if self.mha is not None:
            x = x + self.mha(h, h, h, need_weights=False)[0]
        else:
            n, t, e = h.shape
            q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, e))
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """ViT on images (N, 3, img, img). encoder="blocks": timm's layout (class token and position
    embedding on this module, `Block`s, the class token's output to the head); "torch":
    nn.TransformerEncoder (norm_first, GELU), no tensors of its own, mean pooled."""

    def __init__(self, encoder: str = "blocks", attn: str = "sdpa", img: int = 32, patch: int = 16,
                 dim: int = 192, depth: int = 12, heads: int = 3, classes: int = 100) -> None:
        super().__init__()
        self.patch, self.head = nn.Conv2d(3, dim, patch, patch), nn.Linear(dim, classes)
        self.mean_pool = encoder == "torch"
        if self.mean_pool:
            layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.1, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        else:
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
            self.encoder = nn.Sequential(*(Block(dim, heads, attn) for _ in range(depth)), nn.LayerNorm(dim))

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        if self.mean_pool:
            return self.head(self.encoder(x).mean(1))
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.head(self.encoder(x)[:, 0])


class GNBlock(nn.Module):
    """On (N, cin, H, W): two 3×3 conv + GroupNorm(8), SiLU between and after + the input (1×1 conv)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout)
        self.c2, self.n2 = nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(8, cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.silu(self.n2(self.c2(F.silu(self.n1(self.c1(x))))) + self.skip(x))


def gn_net(width: int = 32, classes: int = 10) -> nn.Module:
    """A GroupNorm + SiLU CNN on images (N, 3, H, W), GNBlocks of width·(1, 2, 2, 4, 4) channels."""
    w = width
    return nn.Sequential(nn.Conv2d(3, w, 3, 1, 1), nn.GroupNorm(8, w), nn.SiLU(), GNBlock(w, w, 1),
                         GNBlock(w, 2 * w, 2), GNBlock(2 * w, 2 * w, 1), GNBlock(2 * w, 4 * w, 2),
                         GNBlock(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, classes))


class RNNClassifier(nn.Module):
    """Token ids (N, T) → Embedding → LSTM or GRU (`kind`) → Linear on the last step's output."""

    def __init__(self, kind: str = "lstm", vocab: int = 2000, emb: int = 64, hidden: int = 128, classes: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](emb, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, tokens):
        return self.fc(self.rnn(self.emb(tokens))[0][:, -1])


class LanguageModel(nn.Module):
    """Token ids (N, T) → Embedding → 2 LSTM or causal Transformer layers → logits (N, T,
    vocab): the MLI paper's WikiText-2 models (200 wide, 33,278 tokens; the Transformer with
    2 heads and its −inf mask a buffer), batch-first."""

    def __init__(self, classes: int = 33278, vocab: int = 33278, width: int = 200, kind: str = "lstm",
                 length: int = 35) -> None:
        super().__init__()
        self.emb, self.dec = nn.Embedding(vocab, width), nn.Linear(width, classes)
        if kind == "lstm":
            self.rnn = nn.LSTM(width, width, 2, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(width, 2, width, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))
            self.register_buffer("positions", 0.1 * torch.randn(length, width))

    def forward(self, tokens):
        if hasattr(self, "rnn"):
            return self.dec(self.rnn(self.emb(tokens))[0])
        return self.dec(self.encoder(self.emb(tokens) + self.positions, mask=self.mask, is_causal=True))


def sequence_cross_entropy(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Each sequence's mean cross entropy over its tokens, logits (N, T, V) and tokens (N, T):
    (N,) with reduction="none", else their sum or mean."""
    per_sequence = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)
    return {"none": per_sequence, "sum": per_sequence.sum(), "mean": per_sequence.mean()}[reduction]


def conv1d_net(cin: int = 16, width: int = 64, classes: int = 10) -> nn.Module:
    """A 1-d CNN on sequences (N, cin, T): four conv + batch norm + ReLU, two max pools."""
    w = width
    return nn.Sequential(
        nn.Conv1d(cin, w, 7, padding=3), nn.BatchNorm1d(w), nn.ReLU(),
        nn.Conv1d(w, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(w, 2 * w, 5, padding=2), nn.BatchNorm1d(2 * w), nn.ReLU(), nn.MaxPool1d(2),
        nn.Conv1d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm1d(2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * w, classes))


def wide_mlp(inputs: int = 512, hidden: int = 2048, depth: int = 3, classes: int = 10) -> nn.Module:
    """Rows (N, inputs) → `depth` × (Linear, LayerNorm, GELU, Dropout) → Linear."""
    layers = []
    for i in range(depth):
        layers += [nn.Linear(hidden if i else inputs, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(0.1)]
    return nn.Sequential(*layers, nn.Linear(hidden, classes))


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm over the channels of (N, C, H, W): its own forward (not mlifast's rule)."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block on (N, dim, H, W): 7×7 depthwise, LayerNorm + MLP channels-last, × gamma, + x."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dw, self.norm = nn.Conv2d(dim, dim, 7, padding=3, groups=dim), nn.LayerNorm(dim)
        self.pw1, self.pw2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x):
        h = self.pw2(F.gelu(self.pw1(self.norm(self.dw(x).permute(0, 2, 3, 1))))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


def convnext(dims: tuple = (32, 64, 128, 256), depths: tuple = (1, 1, 3, 1), classes: int = 100) -> nn.Module:
    """A small ConvNeXt on images (N, 3, H, W): patchify stem, LayerNorm2d + 2×2 conv between stages."""
    layers = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0])]
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], dim, 2, 2)] if i else []
        layers += [ConvNeXtBlock(dim) for _ in range(depth)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(dims[-1]),
                         nn.Linear(dims[-1], classes))


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Size:
    arch: dict  # the builder's keyword arguments; a "vocab" among them makes the inputs token ids
    shape: tuple  # one example's input
    batch: int
    examples: int
    points: int  # K, at 1/K, 2/K, …, 1 along the line


@dataclass(frozen=True)
class Case:
    family: str
    build: Callable[..., nn.Module]  # build(classes=…, **size.arch)
    classes: int
    full: Size
    quick: Size  # small enough for the whole quick check to take seconds, yet well conditioned
    bn: str = "interpolate"
    loss: Callable = F.cross_entropy  # a sequence loss takes a target token a position


def variant(case: Case, family: Optional[str] = None, bn: Optional[str] = None, **arch) -> Case:
    """`case` with another family name, bn policy and/or builder arguments (at both sizes)."""
    full, quick = (dataclasses.replace(s, arch={**s.arch, **arch}) for s in (case.full, case.quick))
    return dataclasses.replace(case, family=family or case.family, bn=bn or case.bn, full=full, quick=quick)


# Quick BN sizes keep ≥ 8 values a channel in the last stage: with 2 (32 px, batch 2) the
# batch statistics are ill-conditioned in float32 (the loop itself is 1e-3 off float64).
_resnet18 = Case("resnet18", resnet18, 100, Size(dict(width=64), (3, 64, 64), 16, 32, 16),
                 Size(dict(width=16), (3, 64, 64), 2, 4, 3), bn="recompute")
_mobilenet = Case("mobilenet", mobilenet, 100, Size(dict(width=0.5, act="relu6"), (3, 64, 64), 16, 32, 16),
                  Size(dict(width=0.25, act="relu6"), (3, 64, 64), 4, 8, 3), bn="recompute")
_vit = Case("vit_timm", ViT, 100, Size(dict(attn="sdpa", patch=16, depth=12), (3, 32, 32), 32, 64, 16),
            Size(dict(attn="sdpa", patch=8, dim=48, depth=2), (3, 32, 32), 2, 4, 3))
_vit_encoder = Case("vit_encoder", ViT, 100, Size(dict(encoder="torch", patch=16, depth=6), (3, 32, 32), 32, 64, 16),
                    Size(dict(encoder="torch", patch=8, dim=48, depth=2), (3, 32, 32), 2, 4, 3))
_lstm = Case("lstm", RNNClassifier, 5, Size(dict(kind="lstm", vocab=2000, hidden=128), (32,), 32, 512, 16),
             Size(dict(kind="lstm", vocab=50, emb=8, hidden=16), (8,), 4, 8, 3))
_conv1d = Case("conv1d", conv1d_net, 10, Size(dict(width=64), (16, 256), 32, 256, 16),
               Size(dict(cin=4, width=8), (4, 32), 4, 8, 3))
CASES = {
    "resnet18": _resnet18,
    "resnet18-interpolate": variant(_resnet18, bn="interpolate"),
    "mobilenet": _mobilenet,
    "mobilenet-interpolate": variant(_mobilenet, bn="interpolate"),
    "mobilenet-hswish": variant(_mobilenet, bn="interpolate", act="hswish"),
    "vit_timm": _vit,
    "vit_mha": variant(_vit, family="vit_mha", attn="mha"),
    "vit_encoder": _vit_encoder,
    "vit_encoder-64tokens": variant(_vit_encoder, patch=4),
    "gn": Case("gn", gn_net, 10, Size(dict(width=32), (3, 32, 32), 16, 32, 16),
               Size(dict(width=16), (3, 16, 16), 2, 4, 3)),
    "lstm": _lstm,
    "gru": variant(_lstm, family="gru", kind="gru"),
    "conv1d": _conv1d,
    "conv1d-recompute": variant(_conv1d, bn="recompute"),
    "lstm_lm": Case("lstm_lm", LanguageModel, 33278, Size(dict(vocab=33278), (35,), 20, 80, 16),
                    Size(dict(vocab=50, width=8), (6,), 2, 4, 3), loss=sequence_cross_entropy),
    "transformer_lm": Case("transformer_lm", LanguageModel, 33278, Size(dict(vocab=33278, kind="transformer"),
                                                                       (35,), 20, 80, 16),
                           Size(dict(vocab=50, width=8, kind="transformer", length=6), (6,), 2, 4, 3),
                           loss=sequence_cross_entropy),
    "widemlp": Case("widemlp", wide_mlp, 10, Size(dict(hidden=2048, depth=3), (512,), 32, 256, 16),
                    Size(dict(inputs=32, hidden=64, depth=2), (32,), 4, 8, 3)),
    "convnext": Case("convnext", convnext, 100, Size({}, (3, 64, 64), 16, 32, 16),
                     Size(dict(dims=(16, 32, 32, 64), depths=(1, 1, 1, 1)), (3, 32, 32), 2, 4, 3)),
}
FAMILIES = tuple(dict.fromkeys(c.family for c in CASES.values()))


def randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    """W._randomize_bn's batch norms, and every GroupNorm's and LayerNorm's affine parameters
    likewise (fresh ones are 1 and 0 in both endpoints: the line would not move them)."""
    W._randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    return model


def workload(name: str, size: str = "full") -> W.ModelWorkload:
    """Case `name` at `size` ("full" or "quick"), the same on every call; its title is the
    case's configuration."""
    case = CASES[name]
    s = getattr(case, size)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(randomize_norms(case.build(classes=case.classes, **s.arch), 10 + seed).eval())
    g = torch.Generator().manual_seed(2)
    if "vocab" in s.arch:
        x = torch.randint(0, s.arch["vocab"], (s.examples, *s.shape), generator=g)
    else:
        x = torch.randn(s.examples, *s.shape, generator=g)
    y = torch.randint(0, case.classes, (s.examples, *s.shape) if case.loss is sequence_cross_entropy else (s.examples,),
                      generator=g)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in models[0].modules())
    title = ", ".join([f"{k}={v}" for k, v in s.arch.items()] + ["in " + "×".join(map(str, s.shape))]
                      + ([f"bn={case.bn}"] if has_bn else []))
    return W.ModelWorkload(name, title, models[0], tuple(models), mlifast.Line(*models),
                           W.line_coords_loss_landscapes(s.points), W._batches(x, y, s.batch), case.bn, s.points,
                           f"K={s.points}, {s.examples} examples, batch {s.batch}", loss=case.loss)


def check(wl: W.ModelWorkload) -> tuple[float, dict, dict]:
    """(the largest relative difference of a point's loss by mlifast from the loop's, each
    implementation's losses, each one's seconds)."""
    losses, seconds = {}, {}
    for impl, fn in IMPLS.items():
        seconds[impl], losses[impl] = C.timed(lambda: fn(wl), "cpu")
    return float(((losses["mlifast"] - losses["loop"]) / losses["loop"]).abs().max()), losses, seconds


def time_interleaved(wl: W.ModelWorkload, repeats: int) -> dict:
    """{implementation: [seconds a call]}, the order alternating each round."""
    times = {impl: [] for impl in IMPLS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(repeats):
            for impl in C.rotate(list(IMPLS), r):
                times[impl].append(C.timed(lambda: IMPLS[impl](wl), "cpu")[0])
    return times


def table_row(wl: W.ModelWorkload, err: float, times: Optional[dict]) -> str:
    timing = ["—"] * 3
    if times:
        med = {impl: statistics.median(t) for impl, t in times.items()}
        timing = [f"{C.fmt_s(med[i])} [{C.fmt_s(min(t))}–{C.fmt_s(max(t))}]" for i, t in times.items()]
        timing.append(f"{med['loop'] / med['mlifast']:.2f}")
    cells = [CASES[wl.name].family, wl.title, wl.num_points, wl.data[0][1].shape[0], wl.num_examples, *timing]
    return "| " + " | ".join(map(str, cells)) + f" | {err:.1e} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, the agreement check only (seconds)")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per case (default 3)")
    p.add_argument("--check-only", action="store_true", help="the agreement check only")
    args = p.parse_args(argv)
    chosen = [f.strip() for f in args.families.split(",") if f.strip()]
    if set(chosen) - set(FAMILIES):
        p.error(f"unknown families {sorted(set(chosen) - set(FAMILIES))}; choose from {','.join(FAMILIES)}")
    size = "quick" if args.quick else "full"
    C.fix_malloc_thresholds()
    print(f"mlifast {mlifast.__version__} from {C.mlifast_source()} · torch {torch.__version__} · {C.cpu_model()} · "
          f"{torch.get_num_threads()} threads · {size} sizes · tolerance {RTOL:g}", flush=True)
    started = time.perf_counter()
    rows, failures = [], []
    for name in (n for n, c in CASES.items() if c.family in chosen):
        try:
            wl = workload(name, size)
            err, losses, seconds = check(wl)
        except Exception:  # noqa: BLE001 - a case that raises is reported, and the others still run
            failures.append(name)
            print(f"{name}: FAIL, raised:\n{traceback.format_exc()}", flush=True)
            continue
        print(f"{name}: {wl.title}; {wl.size_note}: first calls mlifast {seconds['mlifast']:.2f} s, "
              f"loop {seconds['loop']:.2f} s; max rel err {err:.1e}", flush=True)
        if not err <= RTOL:
            worst = int(((losses["mlifast"] - losses["loop"]) / losses["loop"]).abs().argmax())
            failures.append(name)
            print(f"{name}: FAIL: mlifast's losses differ from the loop's by {err:.3g} relative (tolerance {RTOL:g}); "
                  f"worst at c = {float(wl.coords[worst, 0]):.4f}: mlifast {float(losses['mlifast'][worst]):.7f}, "
                  f"loop {float(losses['loop'][worst]):.7f}", flush=True)
            continue
        rows.append(table_row(wl, err, None if args.quick or args.check_only else time_interleaved(wl, args.repeats)))
    elapsed = time.perf_counter() - started
    print("\n| family | config | K | batch | examples | mlifast s, median [min–max] | loop s, median [min–max] "
          "| loop / mlifast | max rel err |\n|---|---|--:|--:|--:|--:|--:|--:|--:|\n" + "\n".join(rows))
    if failures:
        print(f"\nfamilies.py: FAILED {', '.join(failures)} (above); {elapsed:.0f} s in all")
        return 1
    print(f"\nfamilies.py: all {len(rows)} cases agree with the loop; {elapsed:.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
