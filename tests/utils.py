"""Helpers for tests that start real processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script, nproc: int, args=(), timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `script` under torchrun with `nproc` real processes on this machine."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def run_json_worker(script, nproc: int, args, out) -> dict:
    """Runs a worker script under torchrun that writes its results to `out`; returns them."""
    result = run_torchrun(script, nproc, [*args, "--out", out])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(open(out).read())
