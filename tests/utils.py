"""Helpers for tests that start real processes."""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
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


# Launches go through a fork server by default: one process per pytest worker imports torch,
# megatron-core, the trainer and transformers once, and forks a fresh process per rank
# (real processes, real gloo, the script's real `__main__`). A fresh interpreter spends ~8-10
# CPU-s on those imports and torchrun's agent ~3 more, which was most of the suite's CPU time.
# Tests of torchrun itself (signals, kills) and the recorded loss-curve reference start real
# torchrun (`fresh=True`); LOOPMDM_TEST_LAUNCHER=torchrun sends every launch through it.
PRELOAD = [
    "megatron_loopmdm.training.arguments",
    "megatron_loopmdm.training.run",
    "megatron_loopmdm.hf",
    "tests.utils",
]
_FORKSERVER = []


def _fork_context():
    if not _FORKSERVER:
        import multiprocessing

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        _FORKSERVER.append(context)
    return _FORKSERVER[0]


FORKED_CPU_SECONDS = [0.0]  # CPU time of the finished forked ranks (for LOOPMDM_TEST_PROFILE)


def _run_rank(script: str, argv: list, env: dict, cwd: str, out: str, err: str, cpu: str) -> None:
    """One rank, in a process forked from the server: `python script argv` with this env."""
    import atexit
    import resource
    import runpy

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        opened = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdout.reconfigure(line_buffering=True)
    if env.get("PYTHONWARNINGS") == "ignore":
        import warnings

        warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        sys.excepthook(*sys.exc_info())  # torch.distributed's, if installed: "[rankN]:" lines
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            usage = resource.getrusage(resource.RUSAGE_SELF)
            with open(cpu, "w") as f:
                f.write(str(usage.ru_utime + usage.ru_stime))
            os._exit(code)


class ForkedLaunch:
    """`nproc` ranks of `script` forked from the fork server, with torchrun's environment; as
    torchrun: when a rank fails the others are stopped, and the exit status is 0 or 1."""

    def __init__(self, script, nproc: int, args, env: dict, cwd=REPO, distributed=True):
        context = _fork_context()
        self.output_files = [tempfile.NamedTemporaryFile("w+", delete=False) for _ in range(2)]
        paths = [f.name for f in self.output_files]
        port = str(free_port())
        self.ranks = []
        for rank in range(nproc):
            rank_env = dict(env)
            if distributed:
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                                LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
            target_args = (str(script), list(map(str, args)), rank_env, str(cwd), *paths,
                           f"{paths[0]}.cpu{rank}")  # fmt: skip
            process = context.Process(target=_run_rank, args=target_args)
            process.start()
            self.ranks.append(process)
        self.args = [str(script), *map(str, args)]
        self.distributed, self.returncode = distributed, None

    def wait(self, timeout: float) -> int:
        deadline = time.time() + timeout
        while any(p.exitcode is None for p in self.ranks):
            if any(p.exitcode not in (None, 0) for p in self.ranks):
                self.kill(grace=30)
                break
            if time.time() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        if self.distributed:  # torchrun's status
            self.returncode = 0 if all(p.exitcode == 0 for p in self.ranks) else 1
        else:  # the script's own
            self.returncode = self.ranks[0].exitcode
        for rank in range(len(self.ranks)):
            path = f"{self.output_files[0].name}.cpu{rank}"
            if os.path.exists(path):
                FORKED_CPU_SECONDS[0] += float(open(path).read() or 0)
                os.unlink(path)
        return self.returncode

    def kill(self, grace: float = 0) -> None:
        for p in self.ranks:
            if p.exitcode is None:
                p.terminate()
        deadline = time.time() + grace
        for p in self.ranks:
            p.join(max(0.0, deadline - time.time()))
            if p.exitcode is None:
                p.kill()
                p.join()


def start_torchrun(script, nproc: int, args=(), fresh: bool = False):
    """Starts `script` with `nproc` real processes (torchrun's environment) and returns at once.

    Runs started together share the two cores (a one-process run keeps only one busy); their
    output goes to temporary files, so no pipe fills while another run is waited on. `fresh`:
    under real torchrun, fresh interpreters (see PRELOAD above).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if not fresh and os.environ.get("LOOPMDM_TEST_LAUNCHER", "fork") == "fork":
        return ForkedLaunch(script, nproc, args, env)
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        torchrun_command(script, nproc, args), stdout=out, stderr=err, text=True, env=env, cwd=REPO
    )
    process.output_files = (out, err)
    return process


def finish(process, timeout: int = 300) -> subprocess.CompletedProcess:
    """Waits for a run of `start_torchrun`; returns its exit status and output."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=60)
        raise
    texts = []
    for file in process.output_files:
        file.seek(0)
        texts.append(file.read())
        file.close()
        if isinstance(process, ForkedLaunch):
            os.unlink(file.name)
    return subprocess.CompletedProcess(process.args, process.returncode, *texts)


def run_torchrun(script, nproc: int, args=(), timeout: int = 300, fresh: bool = False):
    """Runs `script` with `nproc` real processes on this machine (see `start_torchrun`)."""
    return finish(start_torchrun(script, nproc, args, fresh), timeout)


def run_script(script, args=(), timeout: int = 300, env=None, cwd=REPO):
    """`python script args` (a tool) as one process forked from the launch server (see PRELOAD);
    under LOOPMDM_TEST_LAUNCHER=torchrun a fresh interpreter."""
    env = dict(os.environ if env is None else env)
    env.setdefault("PYTHONWARNINGS", "ignore")
    if os.environ.get("LOOPMDM_TEST_LAUNCHER", "fork") != "fork":
        cmd = [sys.executable, str(script), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=timeout)  # fmt: skip
    return finish(ForkedLaunch(script, 1, args, env, cwd=cwd, distributed=False), timeout)


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
