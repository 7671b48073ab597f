import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

BIN = Path(sys.executable).parent
TINY = ["--data", "digits", "--image-size", "16", "--batch-size", "16", "--num-workers", "0",
        "--knn-bank-size", "200", "--knn-query-size", "100", "--queue-size", "64"]


def run_command(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of our console scripts as a user would, capturing its output."""
    script = shutil.which(name, path=str(BIN)) or name
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout, env=env)


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
    return list(TINY)


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
