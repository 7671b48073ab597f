import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TINY = ["--data", "digits", "--image-size", "16", "--batch-size", "16", "--num-workers", "0",
        "--knn-bank-size", "200", "--knn-query-size", "100", "--queue-size", "64"]


def run_command(name: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of our console scripts as a user would, capturing its output."""
    script = shutil.which(name, path=str(BIN)) or name
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([script, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture
def tiny_args() -> list[str]:
    return list(TINY)
