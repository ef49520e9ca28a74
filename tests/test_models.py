"""mlifast.models: the MLI study's MLP and CIFAR ResNet families (shapes, counts, init, layout)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlifast
from mlifast.models import FAMILIES, mlp, resnet, resnet20, resnet32, resnet44, resnet56
from oracle import oracle_outputs, rel_err


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: intra-op threads only add OpenMP contention on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n=4, channels=3, size=32, seed=0):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def blocks(model):
    return [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]


# ----------------------------------------------------------------------------- ResNets


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("build, n", [(resnet20, 3), (resnet32, 5), (resnet44, 7), (resnet56, 9)])
def test_resnet_shapes_and_depth(build, n, family):
    model = build(family, num_classes=7)
    assert len(blocks(model)) == 3 * n
    # depth = stem conv + 2 convs per block + fc; option-A shortcuts add no conv
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 6 * n + 2
    assert model(images(2, size=32 if n == 3 else 8)).shape == (2, 7)


@pytest.mark.parametrize("family", FAMILIES)
def test_resnet_on_mnist_sized_inputs(family):
    model = resnet(8, family, num_classes=10, in_channels=1, width=8)
    assert model(images(3, channels=1, size=28)).shape == (3, 10)
    assert model.conv1.weight.shape[1] == 1


def expected_resnet_params(n, family, width=16, in_channels=3, classes=10):
    """The parameter count from the architecture: 3×3 bias-free convs, BN (γ, β) after
    every conv in the BN families plus a BN over the input channels of each option-A
    downsampling shortcut, one res_scale per block (no_bn) or 4 biases + 1 scale per block
    and 2 network-level biases (fixup), and a Linear(4·width, classes)."""
    conv = lambda cin, cout: 9 * cin * cout  # noqa: E731
    norm = family in ("bn", "bn_zero_gamma")
    bn = lambda c: 2 * c if norm else 0  # noqa: E731
    per_block_scalars = {"bn": 0, "bn_zero_gamma": 0, "no_bn": 1, "fixup": 5}[family]
    total = conv(in_channels, width) + bn(width) + (2 if family == "fixup" else 0)
    cin = width
    for stage in range(3):
        c = width * 2**stage
        for i in range(n):
            total += conv(cin, c) + bn(c) + conv(c, c) + bn(c) + per_block_scalars
            if i == 0 and stage > 0:
                total += bn(cin)  # shortcut BN over the input channels
            cin = c
    return total + 4 * width * classes + classes


def test_resnet20_bn_parameter_count():
    # By hand: stem 3·16·9 + 32 = 464; stage 1: 3·(2·2304 + 64) = 14016;
    # stage 2: (4608 + 9216 + 128 + 32) + 2·(2·9216 + 128) = 51104;
    # stage 3: (18432 + 36864 + 256 + 64) + 2·(2·36864 + 256) = 203584; fc 650.
    hand = 464 + 14016 + 51104 + 203584 + 650
    assert hand == 269818 == expected_resnet_params(3, "bn")
    assert sum(p.numel() for p in resnet20("bn").parameters()) == hand  # ≈ 0.27M, as in He et al.


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n", [1, 3, 9])
def test_resnet_parameter_counts(family, n):
    model = resnet(6 * n + 2, family, num_classes=100, width=8, in_channels=1)
    got = sum(p.numel() for p in model.parameters())
    assert got == expected_resnet_params(n, family, width=8, in_channels=1, classes=100)


def expected_keys(family, n=3):
    bn = lambda p: [f"{p}.weight", f"{p}.bias", f"{p}.running_mean", f"{p}.running_var",  # noqa: E731
                    f"{p}.num_batches_tracked"]
    keys = ["conv1.weight"] + (bn("bn1") if family.startswith("bn") else []) + (
        ["bias1", "bias2"] if family == "fixup" else [])
    for layer in (1, 2, 3):
        for i in range(n):
            p = f"layer{layer}.{i}"
            keys += [f"{p}.conv1.weight", f"{p}.conv2.weight"]
            if family.startswith("bn"):
                keys += bn(f"{p}.bn1") + bn(f"{p}.bn2") + (bn(f"{p}.downsample.bn0") if layer > 1 and i == 0 else [])
            elif family == "no_bn":
                keys += [f"{p}.res_scale"]
            else:
                keys += [f"{p}.{s}" for s in ("bias1a", "bias1b", "bias2a", "scale", "bias2b")]
    return sorted(keys + ["fc.weight", "fc.bias"])


@pytest.mark.parametrize("family", FAMILIES)
def test_resnet_state_dict_keys_follow_the_official_names(family):
    sd = resnet20(family).state_dict()
    assert sorted(sd) == expected_keys(family)
    scalars = [k for k in sd if k.rsplit(".", 1)[-1] in ("res_scale", "scale", "bias1a", "bias1b", "bias2a",
                                                           "bias2b", "bias1", "bias2")]
    assert all(sd[k].shape == (1,) for k in scalars)


def test_option_a_shortcut_subsamples_and_zero_pads():
    block = resnet20("no_bn").layer2[0]
    x = F.relu(images(2, channels=16, size=8))
    s = block.shortcut(x)
    assert s.shape == (2, 32, 4, 4)
    torch.testing.assert_close(s[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert not s[:, 16:].any()
    assert not any(isinstance(m, nn.Conv2d) for m in block.downsample.modules())


@pytest.mark.parametrize("family", ["bn", "bn_zero_gamma", "no_bn"])
def test_kaiming_fan_out_init(family):
    torch.manual_seed(0)
    model = resnet20(family)
    last_bns = {id(b.bn2) for b in blocks(model)} if family == "bn_zero_gamma" else set()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == (0 if id(m) in last_bns else 1)) and not m.bias.any()
    for w in (model.layer3[2].conv1.weight, model.layer3[0].conv1.weight):  # 64→64 and 32→64: fan_out 64·9
        assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)


def assert_blocks_start_as_shortcut(model, train):
    """Every block returns relu(shortcut(x)) (the identity on post-relu inputs) at init."""
    model.train(train)
    x = F.relu(model.conv1(images(2, size=8)))
    for b in blocks(model):
        out = b(x)
        torch.testing.assert_close(out, F.relu(b.shortcut(x)), rtol=0, atol=1e-6)
        x = out


@pytest.mark.parametrize("train", [True, False])
def test_bn_zero_gamma_blocks_start_as_identity(train):
    model = resnet20("bn_zero_gamma")
    for b in blocks(model):
        assert not b.bn2.weight.any() and torch.all(b.bn1.weight == 1)
    assert torch.all(model.bn1.weight == 1)
    assert_blocks_start_as_shortcut(model, train)


def test_bn_blocks_do_not_start_as_identity():
    model = resnet20("bn")
    assert all(torch.all(b.bn2.weight == 1) for b in blocks(model))
    with pytest.raises(AssertionError):
        assert_blocks_start_as_shortcut(model, True)


def test_no_bn_residual_scales_start_at_zero():
    model = resnet20("no_bn")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(b.res_scale.shape == (1,) and b.res_scale.item() == 0 for b in blocks(model))
    assert_blocks_start_as_shortcut(model, True)


def test_fixup_init():
    torch.manual_seed(0)
    model = resnet20("fixup")
    num_branches = 9
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not model.fc.weight.any() and not model.fc.bias.any()
    for b in blocks(model):
        assert not b.conv2.weight.any()
        assert b.scale.item() == 1
        assert all(getattr(b, s).item() == 0 for s in ("bias1a", "bias1b", "bias2a", "bias2b"))
    assert model.bias1.item() == 0 and model.bias2.item() == 0
    # He-normal (fan_out) · L^(-1/(2m-2)), m = 2: std = sqrt(2 / (64·9)) / sqrt(9), 64·64·9 draws each
    w = torch.cat([b.conv1.weight.flatten() for b in model.layer3[1:]])
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)) / math.sqrt(num_branches), rel=0.02)
    w = model.layer3[0].conv1.weight  # 32→64: fan_out, not fan_in
    assert w.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)) / math.sqrt(num_branches), rel=0.03)
    assert_blocks_start_as_shortcut(model, True)


def test_fixup_output_is_the_final_bias_at_init():
    model = resnet20("fixup")
    with torch.no_grad():
        model.fc.bias.copy_(torch.arange(10.0))  # any bias: the zero weight hides the features
    out = model(images(3, size=16))
    torch.testing.assert_close(out, model.fc.bias.expand(3, 10), rtol=0, atol=0)
    # not so for the other families: their logits depend on the example
    for family in ("bn", "bn_zero_gamma", "no_bn"):
        logits = resnet(8, family).eval()(images(3, size=16))
        assert (logits - logits[:1]).abs().max() > 1e-6


@pytest.mark.parametrize("family", FAMILIES)
def test_every_resnet_parameter_is_used(family):
    """Away from init (no zero weight hides anything) every parameter gets a gradient."""
    torch.manual_seed(0)
    model = resnet(8, family, width=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model(images(3, size=8)).square().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not unused


@pytest.mark.parametrize("depth", [0, 2, 7, 19, 21, 22, -4, 20.0, True])
def test_resnet_depth_must_be_6n_plus_2(depth):
    with pytest.raises(ValueError, match="6n"):
        resnet(depth)


def test_resnet_family_validation_and_paper_labels():
    with pytest.raises(ValueError, match="bn_zero_gamma"):
        resnet(20, "batchnorm")
    for family, label in zip(FAMILIES, ("BN", "BN-I", "NBN-I", "NBN-F")):
        assert resnet(8, label).family == family


@pytest.mark.parametrize("family", FAMILIES)
def test_resnet_trains_and_interpolates(family):
    """One SGD step moves every parameter group the family's init does not freeze, and
    mlifast.interpolate answers for points of a line as the one-point loop does."""
    torch.manual_seed(0)
    a = resnet(8, family, num_classes=5, width=4).double()
    b = resnet(8, family, num_classes=5, width=4).double()
    x, y = images(6, size=8).double(), torch.arange(6) % 5
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(2):  # fixup: the first step moves only fc, the second the rest
        opt.zero_grad()
        F.cross_entropy(b(x), y).backward()
        opt.step()
    moved = [n for n, p in b.named_parameters() if not torch.equal(p, a.state_dict()[n])]
    assert "fc.weight" in moved and "conv1.weight" in moved and len(moved) > len(list(b.parameters())) // 2
    a.eval()
    line = mlifast.Line(a, b)
    coords = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    out = mlifast.interpolate(a, line, coords)(x)
    assert rel_err(out, torch.stack(oracle_outputs(a, line, coords, x))) < 1e-9


# ----------------------------------------------------------------------------- MLP


def test_mlp_layout_without_bn():
    model = mlp()
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten, nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)] == [
        (784, 1024), (1024, 1024), (1024, 10)]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert isinstance(model.flatten, nn.Flatten) and model[1] is model._modules["0"]
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_batch_norm_comes_before_the_activation():
    model = mlp(hidden=(32, 16, 8), batch_norm=True, activation="tanh", in_features=12, num_classes=5)
    kinds = [type(m) for m in model]
    assert kinds == [nn.Flatten] + [nn.Linear, nn.BatchNorm1d, nn.Tanh] * 3 + [nn.Linear]
    assert [m.num_features for m in model if isinstance(m, nn.BatchNorm1d)] == [32, 16, 8]
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = []
    for i in (0, 3, 6):
        expected += [f"{i}.weight", f"{i}.bias"] + [f"{i + 1}.{s}" for s in bn]
    assert list(model.state_dict()) == expected + ["9.weight", "9.bias"]
    assert model.eval()(torch.randn(4, 3, 4)).shape == (4, 5)


def test_mlp_loads_a_plain_sequential_state_dict():
    """The demo's model (a plain nn.Sequential without a Flatten) has the same keys."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    model = mlp(hidden=(128, 128), in_features=32)
    model.load_state_dict(plain.state_dict())  # strict
    x = torch.randn(7, 32)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert list(mlp(hidden=(128, 128), in_features=32).state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("name, kind", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid),
                                        ("gelu", nn.GELU), ("Tanh", nn.Tanh)])
def test_mlp_activations(name, kind):
    model = mlp(hidden=(8, 8), activation=name, in_features=4)
    assert [type(m) for m in model if not isinstance(m, (nn.Linear, nn.Flatten))] == [kind, kind]


def test_mlp_validation():
    with pytest.raises(ValueError, match="relu.*sigmoid|sigmoid.*relu"):
        mlp(activation="swish")
    with pytest.raises(ValueError):
        mlp(hidden=(0, 8))
    linear = mlp(hidden=(), in_features=6, num_classes=3)
    assert [type(m) for m in linear] == [nn.Flatten, nn.Linear]


def test_mlp_with_batch_norm_trains_a_step():
    torch.manual_seed(0)
    model = mlp(hidden=(64, 64), batch_norm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in after if not k.endswith("num_batches_tracked"))
    assert after["1.num_batches_tracked"] == 1
