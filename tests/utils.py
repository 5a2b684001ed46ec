"""Helpers for tests that start real processes."""

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(script, nproc: int, args=()) -> list[str]:
    return [
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


def start_torchrun(script, nproc: int, args=()) -> subprocess.Popen:
    """Starts `script` under torchrun with `nproc` real processes and returns at once.

    Runs started together share the two cores (a one-process run keeps only one busy); their
    output goes to temporary files, so no pipe fills while another run is waited on.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        torchrun_command(script, nproc, args), stdout=out, stderr=err, text=True, env=env, cwd=REPO
    )
    process.output_files = (out, err)
    return process


def finish(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    """Waits for a run of `start_torchrun`; returns its exit status and output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    texts = []
    for file in process.output_files:
        file.seek(0)
        texts.append(file.read())
        file.close()
    return subprocess.CompletedProcess(process.args, process.returncode, *texts)


def run_torchrun(script, nproc: int, args=(), timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `script` under torchrun with `nproc` real processes on this machine."""
    return finish(start_torchrun(script, nproc, args), timeout)


def run_json_worker(script, nproc: int, args, out) -> dict:
    """Runs a worker script under torchrun that writes its results to `out`; returns them."""
    result = run_torchrun(script, nproc, [*args, "--out", out])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(open(out).read())


# Refuses every import of megatron and of this package, as on a machine with only transformers.
_BLOCK_MEGATRON = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("megatron", "megatron_loopmdm"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, _Block())
"""
_CHECK_UNIMPORTED = """
assert not any(m.split(".")[0] in ("megatron", "megatron_loopmdm") for m in sys.modules)
"""


def run_without_megatron(code: str, args, workdir) -> subprocess.CompletedProcess:
    """Runs `code` (with `sys.argv[1:]` = `args`) in a fresh Python where megatron and
    megatron_loopmdm cannot be imported, offline, from `workdir`; afterwards checks neither was
    imported. For what a user with only `transformers` can do with an exported directory."""
    workdir = Path(workdir)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(workdir / "hf_home"), "PYTHONPATH": "", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    cmd = [sys.executable, "-c", _BLOCK_MEGATRON + code + _CHECK_UNIMPORTED, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
