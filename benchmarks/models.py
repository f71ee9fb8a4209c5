"""Seeded synthetic teachers and datasets for the benchmarks (real ones live in pipelines/mnist.py).

``resnet()`` is a ResNet-style conv net on 3x64x64 images (stem, four residual stages, global
average pool, linear head) with seeded random weights: the shapes and costs of a real vision
teacher without downloading one. Stored targets the benchmarks use:

- ``logits`` [1000] (2 KB/sample as float16), ``pool`` [512] (1 KB/sample, the pooled features),
- ``layer1`` [64, 32, 32] (128 KB/sample as float16: the large activation map).

``mnist_rows`` and ``mnist_conv_student`` serve bench_memory's train half (the real MNIST teacher and data).

``text_teacher``, ``text_student`` and ``sentences`` serve bench_pooling: the text example's language model
(pipelines/text.py ``TinyLM``) at the sizes in ``TEXT`` (which bench_pooling sets before building; a pipeline's
``models.py:...`` import path resolves to this same module) over seeded right-padded random sentences.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.data import Dataset

IMAGE = (3, 64, 64)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.skip = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.skip(x))


class ResNet(nn.Module):
    def __init__(self, width: int = 64, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2))  # 64x64 -> 32x32
        self.layer1 = Block(width, width, 1)            # [64, 32, 32]
        self.layer2 = Block(width, 2 * width, 2)        # [128, 16, 16]
        self.layer3 = Block(2 * width, 4 * width, 2)    # [256, 8, 8]
        self.layer4 = Block(4 * width, 8 * width, 2)    # [512, 4, 4]
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # [512]
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.pool(x))


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet().eval()


class Images(Dataset):
    """``n`` seeded 3x64x64 float32 images with labels; batches come from ``__getitems__`` (one slice)."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(n)
        self.x = torch.randn(n, *IMAGE, generator=g)
        self.y = torch.randint(0, 1000, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices)
        return list(zip(self.x[idx].unbind(0), self.y[idx].unbind(0)))


@functools.lru_cache(maxsize=4)
def images(split: str) -> Dataset:
    """The split is the number of images, e.g. ``"2048"``.

    Made once per process and split: the benchmarks' forward-only loops and ``kdcache.extract`` (through
    ``data.factory``) then read the same dataset, and neither run times making it (8,192 seeded images
    take ~0.6 s to draw, as long as the H200's forward over them).
    """
    return Images(int(split))


def mnist_rows(split: str) -> Dataset:
    """The first ``int(split)`` images of the real MNIST ``train`` split (pipelines/mnist.py), e.g. ``"10000"``.

    For stores of N and 4N real rows (bench_memory.py); the whole MNIST file is in RAM either way.
    """
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parent.parent / "pipelines")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import mnist

    return torch.utils.data.Subset(mnist.dataset("train"), range(int(split)))


class ConvStudent(nn.Module):
    """A small MNIST CNN student: conv 1->8 (3x3, stride 2) -> ReLU [8, 14, 14] -> linear 1568 -> 10.

    Its ``relu`` map has the teacher's ``features.4`` grid (the MNIST CNN's second ReLU, [64, 14, 14]), so
    ``train.features`` can distil that 24.5 KB/sample (float16) map through a 1x1 conv head (bench_memory.py).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8 * 14 * 14, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(start_dim=1))


def mnist_conv_student() -> nn.Module:
    """A fresh ``ConvStudent`` (initialised by the current torch RNG, which ``kdcache.train`` seeds)."""
    return ConvStudent()


TEXT = {"width": 256, "tokens": 128}  # bench_pooling's --width and --tokens


def _tiny_lm(width: int, layers: int) -> nn.Module:
    import sys
    from pathlib import Path

    folder = str(Path(__file__).resolve().parent.parent / "pipelines")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import text

    return text.TinyLM(d_model=width, layers=layers, heads=4, max_positions=TEXT["tokens"])


def text_teacher() -> nn.Module:
    """The text example's LM, 2 layers of ``TEXT["width"]``, seeded, in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = _tiny_lm(TEXT["width"], 2)
    return model.eval()


def text_student() -> nn.Module:
    """1 layer of half the teacher's width (initialised by the current torch RNG)."""
    return _tiny_lm(TEXT["width"] // 2, 1)


class Sentences(Dataset):
    """``n`` seeded sentences of random tokens, ``TEXT["tokens"] // 8`` to ``TEXT["tokens"]`` long, right-padded to
    ``TEXT["tokens"]`` positions: items ``{"input_ids", "attention_mask"}`` as pipelines/text.py's."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(n)
        tokens = TEXT["tokens"]
        lengths = torch.randint(max(1, tokens // 8), tokens + 1, (n, 1), generator=g)
        self.mask = (torch.arange(tokens) < lengths).long()  # (n, tokens)
        self.ids = torch.randint(1, 64, (n, tokens), generator=g) * self.mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index]}


def sentences(split: str) -> Dataset:
    """The split is the number of sentences, e.g. ``"512"``."""
    return Sentences(int(split))
