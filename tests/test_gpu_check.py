"""benchmarks/gpu_check.sh, the prepared GPU check: its dry run on the CPU (plan, inputs, imports, pytest ids)
and its step runner (own timeouts, a failure recorded without stopping the others, one results file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_prepare  # noqa: E402

EXPECTED_STEPS = ["install_wheels", "environment", "preflight", "build_models", "throughput", "gpu_test_fsdp1",
                  "gpu_test_deepspeed_zero1_offload", "lora_bf16_fit"]


def write_wheel(path: Path, name: str, version: str) -> Path:
    """A minimal wheel: the dist-info METADATA the dry run looks for (its contents are never installed here)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return path


@pytest.fixture(scope="module")
def carry(tmp_path_factory) -> Path:
    """A carry folder as gpu_check_prepare.py builds it (MiniLM settings copied, SciFact files copied from a
    stand-in), with a wheel of each needed distribution not installed here (deepspeed, hjson)."""
    root = tmp_path_factory.mktemp("gpucheck")
    scifact = root / "scifact_source"
    for name in gpu_check_prepare.SCIFACT_FILES:
        (scifact / name).parent.mkdir(parents=True, exist_ok=True)
        (scifact / name).write_text("{}\n")
    folder = root / "carry"
    copied = gpu_check_prepare.copy_minilm_settings(folder / "minilm")
    assert "model.safetensors" not in copied and "tokenizer.json" in copied   # no weights travel
    gpu_check_prepare.copy_scifact(scifact, folder / "scifact")
    for name in not_installed_here():
        write_wheel(folder / "wheels" / f"{name}-1.0-py3-none-any.whl", name, "1.0")
    return folder


def not_installed_here() -> list[str]:
    from importlib.util import find_spec

    return sorted(gpu_check.distribution_key(distribution) for module, distribution in gpu_check.REQUIRED_MODULES.items()
                  if find_spec(module) is None)


def test_dry_run_plans_every_step_and_passes_on_complete_inputs(carry):
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--carry", str(carry)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu_check: error" not in result.stderr
    planned = [line.split()[2] for line in result.stdout.splitlines() if line.startswith("  phase ")]
    assert planned == EXPECTED_STEPS
    summary = result.stdout.splitlines()[-1]
    wheels = not_installed_here()
    assert summary.startswith(f"dry run: inputs present ({len(wheels)} carried wheels: {', '.join(wheels) or 'none'})")
    for node_id in gpu_check.GPU_TESTS.values():      # the GPU tests' ids resolve (collected, skip-marked here)
        assert node_id in summary


def broken_copy(carry: Path, target: Path, breakage: str) -> Path:
    shutil.copytree(carry, target)
    if breakage == "missing scifact file":
        (target / "scifact" / "qrels" / "train.tsv").unlink()
    elif breakage == "missing wheel":
        (target / "wheels" / "deepspeed-1.0-py3-none-any.whl").unlink()
    elif breakage == "truncated wheel":
        (target / "wheels" / "deepspeed-1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut short")
    return target


@pytest.mark.parametrize("breakage, names", [
    ("missing scifact file", ["scifact/qrels/train.tsv", "not found", "gpu_check_prepare.py"]),
    ("missing wheel", ["wheels", "no wheel of deepspeed", "gpu_check_prepare.py"]),
    ("truncated wheel", ["deepspeed-1.0-py3-none-any.whl", "not a wheel", "download it again"]),
])
def test_a_bad_input_is_one_clear_line_and_nothing_runs(carry, tmp_path, capsys, breakage, names):
    if breakage != "missing scifact file" and "deepspeed" not in not_installed_here():
        pytest.skip("deepspeed is installed here: its wheel is not needed")
    broken = broken_copy(carry, tmp_path / "carry", breakage)
    work = tmp_path / "work"
    assert gpu_check.main(["--carry", str(broken), "--out", str(tmp_path / "out"), "--work", str(work)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("gpu_check: error: "), errors
    assert all(name in errors[0] for name in names), errors[0]
    assert not (tmp_path / "out").exists() and not (work / "logs").exists()   # nothing ran, nothing written


def test_steps_keep_going_after_a_failure_and_a_timeout_and_each_is_recorded(tmp_path):
    """Step 1 fails, step 2 outlives its own 2 s timeout (with a grandchild in its own session, killed too),
    step 3 still runs and passes; the one results file holds all three in plan order after each step."""
    python = sys.executable
    pid_file = tmp_path / "grandchild.pid"
    sleeper = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '60'], start_new_session=True); "
               f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    steps = [gpu_check.Step("fails", 1, "exits 3", 30, [python, "-c", "print('bad input'); raise SystemExit(3)"],
                            gpu_check.exit_check("fine")),
             gpu_check.Step("hangs", 1, "sleeps", 2, [python, "-c", sleeper], gpu_check.exit_check("fine")),
             gpu_check.Step("passes", 2, "prints", 30, [python, "-c", "print('ok')"], gpu_check.exit_check("fine"))]
    results = tmp_path / "out" / gpu_check.RESULTS_FILE
    results.parent.mkdir()
    start = time.monotonic()
    records = gpu_check.run(steps, tmp_path / "work", results, deadline_s=60, summary={"check": "test"})
    assert time.monotonic() - start < 30
    saved = json.loads(results.read_text())
    assert [step["name"] for step in saved["steps"]] == ["fails", "hangs", "passes"]
    status = {step["name"]: step for step in saved["steps"]}
    assert status["fails"]["status"] == "failed" and status["fails"]["detail"] == "exit 3: bad input"
    assert status["hangs"]["status"] == "timeout" and 2 <= status["hangs"]["seconds"] < 20
    assert status["passes"]["status"] == "passed" and status["passes"]["log_tail"] == "ok\n"
    assert saved["all_passed"] is False and saved["table"].splitlines()[-1] == "1 of 3 steps passed"
    assert gpu_check.exit_status(records) == 1 and gpu_check.exit_status(records[-1:]) == 0
    grandchild = Path(f"/proc/{pid_file.read_text()}/stat")
    assert not grandchild.exists() or grandchild.read_text().rsplit(")", 1)[1].split()[0] == "Z"   # killed


def test_deadline_cuts_the_running_step_and_leaves_later_steps_not_run(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)   # (5 s on the device)
    python = sys.executable
    steps = [gpu_check.Step("slow", 1, "sleeps", 30, [python, "-c", "import time; time.sleep(30)"],
                            gpu_check.exit_check("fine")),
             gpu_check.Step("later", 2, "prints", 30, [python, "-c", "print('ok')"], gpu_check.exit_check("fine"))]
    records = gpu_check.run(steps, tmp_path / "work", tmp_path / gpu_check.RESULTS_FILE, deadline_s=2, summary={})
    assert [(r["name"], r["status"]) for r in records] == [("slow", "timeout"), ("later", "not run")]
    assert gpu_check.exit_status(records) == 1
