"""Small real architectures for the parity tests."""
import torch
import torch.nn.functional as F
from torch import nn

from mlifast.models import resnet20


def mlp(dropout=0.2):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 16),
                         nn.Tanh(), nn.Linear(16, 5))


def ResNet20(width=4, num_classes=10):  # noqa: N802
    """The paper's CIFAR ResNet-20 with batch norm, narrow by default to keep tests fast."""
    return resnet20(family="bn", width=width, num_classes=num_classes)


def vgg_like():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect", groups=2), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Conv2d(4, 4, 3, dilation=2),
        nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(), nn.LayerNorm(16), nn.Linear(16, 10), nn.BatchNorm1d(10),
    )


class LayerScaleBlock(nn.Module):
    """Uses its own parameters directly (LayerScale, class token, positional embedding)."""

    def __init__(self, dim=8, tokens=5):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.gamma = nn.Parameter(torch.rand(dim))
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):  # x: (B, tokens, dim)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.norm(x + self.gamma * self.fc(x))[:, 0]


class LSTMLanguageModel(nn.Module):
    """Embedding → LSTM → tied output head."""

    def __init__(self, vocab=11, dim=6, batch_first=True):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, dim, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens):
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


class ReadsChildWeight(nn.Module):
    """A parent computing with its child's weight (or, with `through_data`, with its
    `.data`): the engine cannot interpolate it."""

    def __init__(self, through_data=False):
        super().__init__()
        self.child = nn.Linear(4, 3)
        self.through_data = through_data

    def forward(self, x):
        w = self.child.weight
        assert w.data.shape == w.shape and w.data.dtype == w.dtype  # (metadata: fine)
        return self.child(x) + F.linear(x, w.data if self.through_data else w)


def randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


class TransformerClassifier(nn.Module):
    """Embedding + nn.TransformerEncoder with a padding mask, mean-pooled classifier."""

    def __init__(self, vocab=13, dim=8, heads=2, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=16, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens, padding_mask):
        h = self.embed(tokens if self.batch_first else tokens.t())
        h = self.encoder(h, src_key_padding_mask=padding_mask)
        h = h if self.batch_first else h.transpose(0, 1)
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class SignalNet(nn.Module):
    """Conv1d, ConvTranspose1d, BatchNorm1d on (N, C, L); Conv3d, BatchNorm3d; RMSNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(2, 4, 3, padding=1, padding_mode="circular")
        self.bn1 = nn.BatchNorm1d(4)
        self.up = nn.ConvTranspose1d(4, 3, 3, stride=2, output_padding=1)
        self.conv3 = nn.Conv3d(1, 2, 2)
        self.bn3 = nn.BatchNorm3d(2)
        self.norm = nn.RMSNorm(3 * 18 + 2 * 27)
        self.fc = nn.Linear(3 * 18 + 2 * 27, 4)

    def forward(self, signal, volume):  # (N, 2, 8), (N, 1, 4, 4, 4)
        s = self.up(torch.relu(self.bn1(self.conv1(signal)))).flatten(1)
        v = self.bn3(self.conv3(volume)).flatten(1)
        return self.fc(self.norm(torch.cat([s, v], 1)))


class CapturesBatch(nn.Module):
    """Its Python depends on the batch size: on shared rows it mixes the points."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        n = x.shape[0]
        h = self.fc1(x)
        return self.fc2(torch.tanh(h.reshape(n, -1, 6)).mean(1))
