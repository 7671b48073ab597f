import gzip
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from downstream.detection.scenes import write_synthetic
from seed.backbones import create_backbone
from seed.checkpoints import export_model

BIN = Path(sys.executable).parent
TINY = ["--data", "digits", "--image-size", "16", "--batch-size", "16", "--num-workers", "0",
        "--knn-bank-size", "200", "--knn-query-size", "100"]
#: The default methods of seed-pretrain (MoCo v2) and seed-distill (SEED) keep a queue: a short one.
QUEUE = ["--queue-size", "64"]


def run_command(name: str, *args: str, timeout: int = 300, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one of our console scripts as a user would, capturing its output; ``env``: variables to add to ours; ``cwd``: the
    folder it runs in."""
    script = shutil.which(name, path=str(BIN)) or name
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def free_port() -> int:
    """A TCP port that no process listens on now: the one the OS picks for a socket bound to port 0, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def ddp_env() -> dict[str, str]:
    """The environment of a multi-process run of this test alone: its own rendezvous port (Lightning reads
    MASTER_PORT, else picks one itself in each run), so two DDP tests on two pytest-xdist workers never share one."""
    return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models on a shared 2-core machine: one thread per process (here and in the commands run)
    avoids oversubscribing the cores, which makes small forward passes many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_args() -> list[str]:
    """Tiny settings for the commands' default methods (MoCo v2, SEED); other methods take ``TINY``."""
    return [*TINY, *QUEUE]


def image_folder_of(root: Path, classes: int = 2, train: int = 40, val: int = 10, size: int = 16) -> Path:
    """An ImageFolder at ``root`` (train/ and val/, ``classes`` folders each) of random RGB PNGs."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", val)):
        for label in range(classes):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for number in range(count):
                pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{number}.png")
    return root


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write ``array`` (uint8) in the IDX format: magic 2048 + ndim (2051 images, 2049 labels), then big-endian sizes."""
    header = (2048 + array.ndim).to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def garment_fashion_mnist(root: Path, train: int = 40, val: int = 30) -> Path:
    """A Fashion-MNIST stand-in under ``root/fashion-mnist`` (point $SEED_DATA at ``root``): image i is a two-tone block on
    black, of a size and place that vary with i, so a pasted item can be told from its mirror image; label i % 10."""
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    for prefix, count in (("train", train), ("t10k", val)):
        images = np.zeros((count, 28, 28), dtype=np.uint8)
        for i in range(count):
            top, left, height, width = 2 + i % 3, 3 + i % 4, 20 + i % 5, 14 + i % 7
            images[i, top:top + height, left:left + width // 2] = 250
            images[i, top:top + height, left + width // 2:left + width] = 110
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10)
    return folder


# ---- detection: a synthetic VOC/COCO set and exported students, made once per test module

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    return write_synthetic(tmp_path_factory.mktemp("detection-data"), train_images=12, test_images=4, size=64, seed=1)


def _random_student(folder: Path, arch: str) -> Path:
    """A randomly initialised ``arch`` exported as our student file (seed 0)."""
    torch.manual_seed(0)
    export_model(folder / "student.pt", arch, create_backbone(arch), None, None, "seed", {}, False)
    return folder / "student.pt"


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> Path:
    return _random_student(tmp_path_factory.mktemp("detection-ckpt"), "r18")


@pytest.fixture(scope="module")
def mobile_student(tmp_path_factory) -> Path:
    return _random_student(tmp_path_factory.mktemp("detection-mbv3s"), "mbv3s")
