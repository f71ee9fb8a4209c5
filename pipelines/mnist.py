"""MNIST demo factories: the pretrained teacher, the student and the datasets.

Only torch and numpy are needed. The data live in ``data/`` at the repository
root (see ``data/README.md``); set ``KDCACHE_DATA`` to use another folder.

* ``teacher()``  -- the ccexam ``MNISTNet`` CNN (421,642 parameters, 99.05 % test
  accuracy), weights from ``mnist_cnn.pt``; returned in eval mode.
* ``student()``  -- a 784-H-10 MLP with ``H = STUDENT_HIDDEN`` (>= 10x smaller).
* ``dataset(split)`` -- ``"train"`` (50,000), ``"val"`` (10,000) or ``"test"``
  (10,000); items are ``(x, y)``: ``x`` float32 ``(1, 28, 28)`` normalised with
  mean 0.1307 / std 0.3081 after scaling the raw bytes by 1/255 (torchvision
  ``ToTensor`` convention, as the teacher was trained), ``y`` an int64 0-dim tensor.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

MEAN = 0.1307
STD = 0.3081
SPLITS = ("train", "val", "test")
STUDENT_HIDDEN = 50
TEACHER_FILE = "mnist_cnn.pt"
DATA_FILE = "mnist.npz"

__all__ = ["teacher", "student", "dataset", "MNISTDataset", "MNISTNet", "data_dir",
           "MEAN", "STD", "SPLITS", "STUDENT_HIDDEN"]


# what to do where data_dir() holds no file: a copy of this file in a project of one's own looks in ITS_FOLDER/../data,
# which prepare_data.py (writing the repository's data/) does not fill
_WHERE = ("set KDCACHE_DATA to the folder holding mnist.npz and mnist_cnn.pt (kdcache's data/), or write them there with "
          "`python pipelines/prepare_data.py --out FOLDER`")


def data_dir() -> Path:
    """The folder holding ``mnist.npz`` and ``mnist_cnn.pt`` (``$KDCACHE_DATA`` overrides)."""
    env = os.environ.get("KDCACHE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "data"


# ----------------------------------------------------------------------------- models

class MNISTNet(nn.Module):
    """ccexam 1.0.0 ``MNISTNet`` (MIT, (c) 2026 FYS-8805-Collaborative-Coding), same module names."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(64 * 7 * 7, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = x.flatten(start_dim=1)
        return self.classifier(x)


class MLPStudent(nn.Module):
    """flatten -> fc1 (784 -> hidden) -> ReLU -> fc2 (hidden -> 10)."""

    def __init__(self, hidden: int = STUDENT_HIDDEN) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(start_dim=1))))


def teacher() -> nn.Module:
    """The pretrained teacher, weights loaded strictly from ``data_dir()/mnist_cnn.pt``, in eval mode."""
    path = data_dir() / TEACHER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights not found: {path}; {_WHERE}")
    model = MNISTNet()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def student(hidden: int = STUDENT_HIDDEN) -> nn.Module:
    """A fresh (randomly initialised, by the current torch RNG) 784-hidden-10 MLP."""
    return MLPStudent(hidden)


# ----------------------------------------------------------------------------- data

_ARRAYS: dict[str, dict[str, np.ndarray]] = {}
_LOCK = threading.Lock()


def _load_arrays(folder: Path) -> dict[str, np.ndarray]:
    """All six uint8 arrays of ``folder/mnist.npz``, read once per process and folder."""
    key = str(folder.resolve())
    arrays = _ARRAYS.get(key)
    if arrays is None:
        with _LOCK:
            arrays = _ARRAYS.get(key)
            if arrays is None:
                path = folder / DATA_FILE
                if not path.is_file():
                    raise FileNotFoundError(f"MNIST data not found: {path}; {_WHERE}")
                with np.load(path, allow_pickle=False) as z:
                    arrays = {name: np.ascontiguousarray(z[name]) for name in z.files}
                _ARRAYS[key] = arrays
    return arrays


class MNISTDataset(torch.utils.data.Dataset):
    """Map-style view of one split; keeps uint8 pixels, normalises on access.

    Pickles as (split, folder) only, so DataLoader workers reload the arrays
    from the file (once per worker process) instead of receiving copies.
    """

    def __init__(self, split: str, folder: Path | str | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown MNIST split {split!r}; choose one of {', '.join(SPLITS)}")
        self.split = split
        self.folder = Path(folder) if folder is not None else data_dir()
        self._bind()

    def _bind(self) -> None:
        arrays = _load_arrays(self.folder)
        self._x = torch.from_numpy(arrays[f"{self.split}_x"])  # (N, 28, 28) uint8, shares memory
        self._y = torch.from_numpy(arrays[f"{self.split}_y"].astype(np.int64))

    def __getstate__(self) -> dict:
        return {"split": self.split, "folder": self.folder}

    def __setstate__(self, state: dict) -> None:
        self.split = state["split"]
        self.folder = state["folder"]
        self._bind()

    def __len__(self) -> int:
        return int(self._x.shape[0])

    @staticmethod
    def _normalise(x_uint8: torch.Tensor) -> torch.Tensor:
        return (x_uint8.to(torch.float32) / 255.0 - MEAN) / STD

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for MNIST {self.split} split of {n}")
        x = self._normalise(self._x[index]).unsqueeze(0)
        return x, self._y[index].clone()

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices,
                              dtype=torch.int64)
        n = len(self)
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"index out of range for MNIST {self.split} split of {n}")
        xs = self._normalise(self._x[idx]).unsqueeze(1)  # (B, 1, 28, 28)
        ys = self._y[idx]
        return list(zip(xs.unbind(0), ys.unbind(0)))

    def __repr__(self) -> str:
        return f"MNISTDataset(split={self.split!r}, n={len(self)}, folder={str(self.folder)!r})"


def dataset(split: str) -> torch.utils.data.Dataset:
    """The ``split`` ("train", "val" or "test") of the embedded MNIST, normalised (0.1307, 0.3081)."""
    return MNISTDataset(split)
