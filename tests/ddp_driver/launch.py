"""Run `python -m codiemb_pl ...` in a subprocess (1 or 2 gloo ranks) the way a user would."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
BASE_CONFIG = Path(__file__).with_name("tiny_ddp.yaml")
DDP_CPU_CONFIG = REPO_ROOT / "configs" / "trainer" / "ddp_cpu.yaml"


def run_codiemb(args: list[str], *, world_size: int = 1, timeout: float = 240.0) -> subprocess.CompletedProcess:
    """`python -m codiemb_pl fit --config tiny_ddp.yaml [ddp_cpu.yaml] ARGS` with `tests/` importable.

    The whole process group (Lightning starts rank 1 as a child of rank 0) is killed on timeout, so a
    mismatched collective fails the test instead of hanging it.
    """
    command = [sys.executable, "-m", "codiemb_pl", "fit", "--config", str(BASE_CONFIG)]
    if world_size > 1:
        command += ["--config", str(DDP_CPU_CONFIG), "--trainer.devices", str(world_size)]
    command += args
    if not any(arg.startswith("--trainer.default_root_dir") for arg in args):
        # LightningCLI writes config.yaml into the root dir: never let it default to the repository
        command += ["--trainer.default_root_dir", tempfile.mkdtemp(prefix="codiemb-ddp-")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline",
               TOKENIZERS_PARALLELISM="false")
    # a port no other run started by these tests holds (runs may overlap: `RunPool`, pytest-xdist); also for
    # world_size 1, whose arguments may still ask for 2 devices (the FSDP2 runs)
    env["MASTER_PORT"] = str(unused_port())
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"codiemb did not finish in {timeout}s (hung collective?)\n{output[-4000:]}")
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # a rank left behind (e.g. after an interrupt)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(command, process.returncode, output, "")


_PORTS_GIVEN: set[int] = set()
_PORTS_LOCK = threading.Lock()


def unused_port() -> int:
    """A free local TCP port, never one handed out before in this test session (overlapping runs cannot share
    one): not by this process, nor, under pytest-xdist, by another worker (the workers list theirs in one file
    in the temporary folder, named by the session's xdist id, and lock it while they pick)."""
    session = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    with _PORTS_LOCK, contextlib.ExitStack() as stack:
        shared = None
        if session:
            shared = stack.enter_context(open(Path(tempfile.gettempdir()) / f"codiemb-test-ports-{session}", "a+"))
            fcntl.flock(shared, fcntl.LOCK_EX)   # released when the file closes
            shared.seek(0)
            _PORTS_GIVEN.update(int(line) for line in shared.read().split())
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            if port not in _PORTS_GIVEN:
                _PORTS_GIVEN.add(port)
                if shared is not None:
                    shared.write(f"{port}\n")
                return port


class RunPool:
    """Runs `run_codiemb` calls two at a time in the background; `submit` returns a Future of its result.

    Overlapping two runs keeps both cores busy: a run spends most of its time importing torch and Lightning
    on one core, and a 2-rank run's rank 0 waits idle while rank 1 starts. Use as a context manager (it
    waits for the runs still going when it closes).
    """

    def __init__(self, parallel: int = 2):
        self.executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="codiemb-run")

    def submit(self, args: list[str], *, world_size: int = 1, timeout: float = 300.0) -> Future:
        return self.executor.submit(run_codiemb, args, world_size=world_size, timeout=timeout)

    def __enter__(self) -> "RunPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


def model_without_dropout(source: Path, target: Path) -> Path:
    """A copy of a Hugging Face model folder with dropout switched off (deterministic gradients)."""
    if not target.exists():
        shutil.copytree(source, target)
        config_path = target / "config.json"
        config = json.loads(config_path.read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config_path.write_text(json.dumps(config, indent=2))
    return target


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
