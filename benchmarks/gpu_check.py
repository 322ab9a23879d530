"""The GPU check's driver: plan, input checks, steps with their own timeouts, one results file.

    bash benchmarks/gpu_check.sh [--dry-run] [--carry DIR] [--out DIR] [--steps NAME,...] [--deadline-s S]

What it needs on the device and why: `benchmarks/gpu_check.sh`'s header. Steps, in phases (the steps of a
phase run at the same time; throughput runs alone so nothing else disturbs its timing):

  1 install_wheels      the carried wheels, `pip install --no-index --no-deps --target WORK/site`
  2 environment         nvidia-smi, torch / CUDA / cuDNN / NCCL, package versions (and which were carried)
  2 preflight           every module imports; the GPU tests' pytest node ids resolve
  2 build_models        a random-weight BERT of all-MiniLM-L6-v2's shape; the tiny random Qwen2 decoder
  3 throughput          benchmarks/throughput.py on CUDA, bf16-mixed, 4 DataLoader workers, token cache
  4 gpu_test_fsdp1      tests/test_fsdp.py: FSDP1 first step equals DDP's (skip-marked without CUDA)
  4 gpu_test_deepspeed_zero1_offload   the same for DeepSpeed ZeRO-1 with the AdamW states on the CPU
  4 lora_bf16_fit       `codiemb fit` of the tiny decoder with LoRA in bf16: losses finite, export loads

A step that fails or times out is recorded and the others still run. `--deadline-s` caps the whole run: a
step gets min(its timeout, time left); steps with no time left are recorded as "not run". The results file
`<out>/gpu_check.json` is rewritten after every step (a run cut short still reports what finished): each
step's status, seconds, one-line detail, data and log tail, and a text table (also printed). Exit status: 0
all passed, 1 a step failed, timed out or was not run, 2 an input is missing (one line each, nothing run).
`--dry-run` (no GPU needed) prints the plan, checks the inputs and runs the preflight (imports that do not
come from carried wheels, pytest collection), then stops.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from codiemb_pl.errors import InputError  # noqa: E402

STEPS_PROGRAM = REPO / "benchmarks" / "gpu_check_steps.py"
RESULTS_FILE = "gpu_check.json"
GPU_TESTS = {
    "gpu_test_fsdp1": "tests/test_fsdp.py::test_sharded_first_step_equals_ddp_on_one_gpu[fsdp1]",
    "gpu_test_deepspeed_zero1_offload":
        "tests/test_fsdp.py::test_sharded_first_step_equals_ddp_on_one_gpu[deepspeed_zero1_offload]",
}
REQUIRED_MODULES = {  # module -> distribution (a carried wheel's name)
    "torch": "torch", "lightning": "lightning", "transformers": "transformers", "tokenizers": "tokenizers",
    "safetensors": "safetensors", "peft": "peft", "sentence_transformers": "sentence-transformers",
    "accelerate": "accelerate", "datasets": "datasets", "dill": "dill", "multiprocess": "multiprocess",
    "jsonargparse": "jsonargparse", "docstring_parser": "docstring-parser", "typeshed_client": "typeshed-client",
    "yaml": "pyyaml", "pyarrow": "pyarrow", "numpy": "numpy", "pytest": "pytest", "deepspeed": "deepspeed",
    "pydantic": "pydantic", "hjson": "hjson",
}
PROJECT_MODULES = ("codiemb_pl.cli.main", "codiemb_pl.cli.lightning", "codiemb_pl.training.module", "codiemb_pl.data.datamodule",
                   "codiemb_pl.workflows.evaluation", "codiemb_pl.callbacks", "codiemb_pl.model.lora", "codiemb_pl.training.sharding",
                   "codiemb_pl.model.encoder")
"""What the steps import from the project (throughput.py, the CLI's fit, the LoRA check)."""
MINILM_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                "modules.json", "sentence_bert_config.json", "1_Pooling/config.json")
SCIFACT_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")
REPO_FILES = ("benchmarks/throughput.py", "benchmarks/gpu_check_steps.py", "tests/test_fsdp.py",
              "tests/decoder_models.py", "tests/ddp_driver/probes.py", "tests/conf/tiny.yaml",
              "configs/trainer/fsdp.yaml", "configs/trainer/deepspeed_zero1_offload.yaml")
THROUGHPUT_SETTING = ("--device", "cuda", "--precision", "bf16-mixed", "--num-workers", "4", "--batch-size", "128",
                      "--max-length", "128", "--length-buckets", "1", "--rounds", "1", "--train-steps", "12",
                      "--encode-texts", "512", "--eval-extra-docs", "200")
MIN_STEP_S = 5.0
"""A step is not started with less than this left of the --deadline-s budget."""
PREPARE_FIX = "build the carry folder with `python benchmarks/gpu_check_prepare.py` and pass it as --carry"


@dataclass
class Step:
    name: str
    phase: int
    what: str
    timeout_s: float
    command: list[str]
    check: Callable[[int, str], tuple[bool, str, dict]]
    """(exit code, log text) -> (passed, one-line detail, data)"""
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------------
# Inputs

def distribution_key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried_wheels(carry: Path) -> dict[str, Path]:
    """Distribution name -> wheel file in `carry/wheels`."""
    folder = carry / "wheels"
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    return {distribution_key(path.name.split("-")[0]): path for path in wheels}


def check_inputs(carry: Path) -> tuple[list[InputError], dict[str, Path]]:
    """Every problem with the inputs (files, wheels, modules), each one `InputError`; and the carried wheels."""
    from importlib.util import find_spec

    problems = [InputError(str(REPO / name), "not found", "check out the whole repository")
                for name in REPO_FILES if not (REPO / name).is_file()]
    if not carry.is_dir():
        return problems + [InputError(str(carry), "carry folder not found", PREPARE_FIX)], {}
    problems += [InputError(str(carry / "minilm" / name), "not found", PREPARE_FIX)
                 for name in MINILM_FILES if not (carry / "minilm" / name).is_file()]
    problems += [InputError(str(carry / "scifact" / name), "not found", PREPARE_FIX)
                 for name in SCIFACT_FILES if not (carry / "scifact" / name).is_file()]
    wheels = carried_wheels(carry)
    for wheel in wheels.values():
        try:
            with zipfile.ZipFile(wheel) as archive:
                if not any(name.endswith(".dist-info/METADATA") for name in archive.namelist()):
                    problems.append(InputError(str(wheel), "no .dist-info/METADATA inside", "download it again"))
        except (zipfile.BadZipFile, OSError) as error:
            problems.append(InputError(str(wheel), f"not a wheel ({error})", "download it again"))
    for module, distribution in REQUIRED_MODULES.items():
        if distribution_key(distribution) not in wheels and find_spec(module) is None:
            problems.append(InputError(str(carry / "wheels"), f"no wheel of {distribution} and `import {module}` "
                                       "finds nothing here", PREPARE_FIX))
    return problems, wheels


# ---------------------------------------------------------------------------------------------------
# Steps

def json_check(path: Path, summary: Callable[[dict], str]) -> Callable[[int, str], tuple[bool, str, dict]]:
    """A step program's JSON: passed when it exited 0 with no problems; the detail is `summary` or the problems."""
    def check(code: int, log: str) -> tuple[bool, str, dict]:
        if not path.is_file():
            return False, f"exit {code}, no {path.name}: {last_line(log)}", {}
        data = json.loads(path.read_text())
        if code != 0 or data.get("problems"):
            return False, "; ".join(data.get("problems") or [f"exit {code}: {last_line(log)}"]), data
        return True, summary(data), data
    return check


def exit_check(summary: str) -> Callable[[int, str], tuple[bool, str, dict]]:
    return lambda code, log: (code == 0, summary if code == 0 else f"exit {code}: {last_line(log)}", {})


def pytest_check(junit: Path) -> Callable[[int, str], tuple[bool, str, dict]]:
    """Passed when the one test passed: a skip on the GPU machine is a failure of the check."""
    def check(code: int, log: str) -> tuple[bool, str, dict]:
        if not junit.is_file():
            return False, f"exit {code}, no junit report: {last_line(log)}", {}
        case = ElementTree.parse(junit).getroot().find(".//testcase")
        if case is None:
            return False, "no test ran", {}
        for outcome in ("skipped", "failure", "error"):
            found = case.find(outcome)
            if found is not None:
                message = (found.get("message") or found.text or "").strip().splitlines()
                return False, f"{outcome}: {message[0] if message else ''}"[:400], {"outcome": outcome}
        return code == 0, f"passed in {float(case.get('time', 0)):.1f} s", {"outcome": "passed"}
    return check


def throughput_check(path: Path, cache: Path) -> Callable[[int, str], tuple[bool, str, dict]]:
    def check(code: int, log: str) -> tuple[bool, str, dict]:
        if code != 0 or not path.is_file():
            return False, f"exit {code}: {last_line(log)}", {}
        data = json.loads(path.read_text())
        data["token_cache_entries"] = sorted(p.name for p in cache.glob("tokens-*") if p.is_dir())
        median = data["median"]
        if not data["token_cache_entries"]:
            return False, f"no token cache entry in {cache}", data
        return True, (f"train pairs/s ours {median['train_ours']:.0f} / ST {median['train_theirs']:.0f} "
                      f"({median['train_ours'] / median['train_theirs']:.2f}x), encode/s {median['encode_ours']:.0f} / "
                      f"{median['encode_theirs']:.0f}, MFU {data['mfu_ours']:.1%}"), data
    return check


def plan(carry: Path, work: Path, wheels: dict[str, Path], serial: bool) -> list[Step]:
    python, steps = sys.executable, str(STEPS_PROGRAM)
    models = work / "models"
    install = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
               "--upgrade", "--target", str(work / "site"), *map(str, wheels.values())]
    if not wheels:
        install = [python, "-c", "print('no carried wheels')"]
    modules = ",".join([*REQUIRED_MODULES, *PROJECT_MODULES])
    plan_ = [
        Step("install_wheels", 1, f"pip install {len(wheels)} carried wheels into WORK/site "
             f"({', '.join(sorted(wheels)) or 'none'})", 90, install,
             exit_check(f"{len(wheels)} wheels into {work / 'site'}")),
        Step("environment", 2, "nvidia-smi, torch/CUDA/cuDNN/NCCL, package versions", 60,
             [python, steps, "environment", "--json", str(work / "environment.json"), "--site", str(work / "site")],
             json_check(work / "environment.json", lambda d: f"{d['torch'].get('device')}, torch {d['torch']['version']}"
                        f" (CUDA {d['torch']['cuda']}), {d['cpus']} CPUs"), needs=("install_wheels",)),
        Step("preflight", 2, f"import {len(REQUIRED_MODULES) + len(PROJECT_MODULES)} modules; pytest collects "
             f"{len(GPU_TESTS)} GPU test ids", 120,
             [python, steps, "preflight", "--json", str(work / "preflight.json"), "--modules", modules,
              "--node-ids", *GPU_TESTS.values()],
             json_check(work / "preflight.json", lambda d: f"imports ok, {len(d['collected'])} tests collected"),
             needs=("install_wheels",)),
        Step("build_models", 2, "random-weight BERT of all-MiniLM-L6-v2's shape (its config and tokenizer "
             "carried); tiny random Qwen2 decoder (hidden 128)", 120,
             [python, steps, "build-models", "--minilm", str(carry / "minilm"), "--out", str(models),
              "--json", str(work / "models.json")],
             json_check(work / "models.json", lambda d: f"MiniLM-shaped BERT, {d['minilm_parameters'] / 1e6:.1f}M "
                        "parameters; Qwen2 tiny"), needs=("install_wheels",)),
        Step("throughput", 3, "benchmarks/throughput.py " + " ".join(THROUGHPUT_SETTING) + " (ours vs "
             "sentence-transformers; our trainer reads the token cache)", 240,
             [python, str(REPO / "benchmarks" / "throughput.py"), "--model", str(models / "minilm_random"),
              "--scifact", str(carry / "scifact"), *THROUGHPUT_SETTING, "--json", str(work / "throughput.json")],
             throughput_check(work / "throughput.json", work / "hf" / "datasets" / "codiemb"),
             needs=("install_wheels", "build_models")),
    ]
    for name, node_id in GPU_TESTS.items():
        junit = work / f"junit_{name}.xml"
        plan_.append(Step(name, 4, f"pytest {node_id}", 240 if "deepspeed" in name else 180,
                          [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rA", f"--junitxml={junit}",
                           node_id], pytest_check(junit),
                          env={"DS_ACCELERATOR": "cuda"} if "deepspeed" in name else {}, needs=("install_wheels",)))
    plan_.append(Step("lora_bf16_fit", 4, "codiemb fit, tiny Qwen2 + LoRA r=8 all-linear, bf16-mixed, 8 steps, "
                      "IR + STS demo data, validation, export of the best checkpoint", 180,
                      [python, steps, "lora-fit", "--decoder", str(models / "qwen2_tiny"), "--work", str(work / "lora"),
                       "--json", str(work / "lora.json")],
                      json_check(work / "lora.json", lambda d: f"losses {d['losses'][0]:.3f} -> {d['losses'][-1]:.3f}, "
                                 f"export loads (ST max |diff| {d['max_abs_difference_vs_sentence_transformers']:.1e})"),
                      needs=("install_wheels", "build_models")))
    if serial:
        for index, step in enumerate(plan_):
            step.phase = index + 1
    return plan_


def select(steps: list[Step], names: Optional[str]) -> list[Step]:
    """The steps named (comma-separated) and the steps they need, in plan order."""
    if not names:
        return steps
    known = {step.name: step for step in steps}
    wanted = set()
    for name in names.split(","):
        if name not in known:
            raise InputError("--steps", f"unknown step {name!r}", f"use some of {', '.join(known)}")
        wanted |= {name, *known[name].needs}
    return [step for step in steps if step.name in wanted]


# ---------------------------------------------------------------------------------------------------
# Running

def last_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), so a timeout also ends what a step started in other sessions."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    for process in [*descendants(pid), pid]:
        try:
            os.kill(process, signal.SIGKILL)
        except ProcessLookupError:
            pass


def base_env(work: Path) -> dict[str, str]:
    paths = [str(work / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), HF_HUB_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false",
                HF_HOME=str(work / "hf"), HF_DATASETS_CACHE=str(work / "hf" / "datasets"),
                TORCH_EXTENSIONS_DIR=str(work / "torch_extensions"), PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")


def run_step(step: Step, work: Path, deadline: float) -> dict:
    record = {"name": step.name, "phase": step.phase, "what": step.what, "command": " ".join(step.command),
              "timeout_s": step.timeout_s}
    left = deadline - time.monotonic()
    if left < MIN_STEP_S:
        return {**record, "status": "not run", "seconds": 0.0, "detail": "the --deadline-s budget was spent"}
    timeout = min(step.timeout_s, left)
    log_path = work / "logs" / f"{step.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(step.command, cwd=REPO, env={**base_env(work), **step.env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code, timed_out = process.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            code, timed_out = process.wait(), True
    seconds = round(time.monotonic() - start, 1)
    text = log_path.read_text(errors="replace")
    if timed_out:
        status, detail, data = "timeout", f"stopped after {timeout:.0f} s: {last_line(text)}", {}
    else:
        try:
            passed, detail, data = step.check(code, text)
        except Exception as error:  # noqa: BLE001 - a broken output is a failed step, not a crashed check
            passed, detail, data = False, f"reading its output: {type(error).__name__}: {error}", {}
        status = "passed" if passed else "failed"
    return {**record, "status": status, "seconds": seconds, "exit": code, "detail": detail, "data": data,
            "log_tail": text[-4000:]}


def exit_status(records: list[dict]) -> int:
    """0 when every step passed, else 1."""
    return 0 if records and all(record["status"] == "passed" for record in records) else 1


def table(records: list[dict]) -> str:
    lines = [f"{'step':<34} {'status':<8} {'seconds':>8}  detail"]
    lines += [f"{r['name']:<34} {r['status']:<8} {r['seconds']:>8.1f}  {r['detail']}" for r in records]
    passed = sum(r["status"] == "passed" for r in records)
    lines.append(f"{passed} of {len(records)} steps passed")
    return "\n".join(lines)


def write_results(path: Path, summary: dict, records: list[dict], order: list[str]) -> None:
    ordered = sorted(records, key=lambda r: order.index(r["name"]))
    payload = {**summary, "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "all_passed": exit_status(records) == 0,
               "steps": ordered, "table": table(ordered)}
    staging = path.with_suffix(".json.partial")
    staging.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(staging, path)


def run(steps: list[Step], work: Path, results: Path, deadline_s: float, summary: dict) -> list[dict]:
    """Run the phases in order, the steps of one phase together; rewrite `results` after each step."""
    deadline, records, lock = time.monotonic() + deadline_s, [], threading.Lock()

    def one(step: Step) -> None:
        record = run_step(step, work, deadline)
        with lock:
            records.append(record)
            write_results(results, summary, records, [s.name for s in steps])
            print(f"[gpu_check] {record['name']}: {record['status']} ({record['seconds']:.1f} s) {record['detail']}",
                  flush=True)

    for phase in sorted({step.phase for step in steps}):
        members = [step for step in steps if step.phase == phase]
        with ThreadPoolExecutor(max_workers=len(members)) as pool:
            list(pool.map(one, members))
    return records


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check the inputs; run nothing")
    parser.add_argument("--carry", default=str(REPO / ".gpucheck"), help="folder gpu_check_prepare.py built")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    parser.add_argument("--work", help="scratch folder (default: a new one under the temporary folder)")
    parser.add_argument("--steps", help="only these steps (comma-separated) and the steps they need")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="wall-clock budget of all steps")
    parser.add_argument("--serial", action="store_true", help="one step at a time (no concurrent phase 4)")
    args = parser.parse_args(argv)
    carry = Path(args.carry).resolve()
    if args.dry_run and not args.work:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as scratch:
            return checked_run(args, carry, Path(scratch))
    return checked_run(args, carry, Path(args.work or tempfile.mkdtemp(prefix="gpu_check-")).resolve())


def checked_run(args: argparse.Namespace, carry: Path, work: Path) -> int:
    """Check the inputs, print the plan; then the dry run's preflight, or the steps."""
    problems, wheels = check_inputs(carry)
    if not args.dry_run and not args.out:
        problems.append(InputError("--out", "no results folder", "pass --out DIR (the device tool sets $OUT)"))
    try:
        steps = select(plan(carry, work, wheels, args.serial), args.steps)
    except InputError as error:
        problems.append(error)
        steps = []
    print(f"gpu_check plan (carry {carry}, work {work}, deadline {args.deadline_s:.0f} s, results "
          f"{Path(args.out) / RESULTS_FILE if args.out else '-'}):")
    for step in steps:
        print(f"  phase {step.phase}  {step.name:<34} {step.timeout_s:>4.0f} s  {step.what}")
    if problems:
        for problem in problems:
            print(f"gpu_check: error: {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        modules = [m for m, d in REQUIRED_MODULES.items() if distribution_key(d) not in wheels] + list(PROJECT_MODULES)
        preflight = subprocess.run([sys.executable, str(STEPS_PROGRAM), "preflight", "--json", str(work / "preflight.json"),
                                    "--modules", ",".join(modules), "--node-ids", *GPU_TESTS.values()], cwd=REPO,
                                   env=base_env(work), capture_output=True, text=True)
        report = json.loads((work / "preflight.json").read_text()) if (work / "preflight.json").is_file() else \
            {"problems": [f"preflight exited {preflight.returncode}: {last_line(preflight.stdout + preflight.stderr)}"]}
        for problem in report["problems"]:
            print(f"gpu_check: error: preflight: {problem}", file=sys.stderr)
        if report["problems"]:
            return 2
        print(f"dry run: inputs present ({len(wheels)} carried wheels: {', '.join(sorted(wheels)) or 'none'}); "
              f"{len(modules)} modules import here (the {len(REQUIRED_MODULES) + len(PROJECT_MODULES) - len(modules)} "
              f"from wheels are imported on the device); collected {', '.join(report['collected'])}; nothing run")
        return 0
    results = Path(args.out) / RESULTS_FILE
    results.parent.mkdir(parents=True, exist_ok=True)
    summary = {"check": "codiemb_pl GPU check (benchmarks/gpu_check.sh)",
               "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "carry": str(carry),
               "work": str(work), "deadline_s": args.deadline_s, "argv": sys.argv[1:]}
    records = run(steps, work, results, args.deadline_s, summary)
    print(json.loads(results.read_text())["table"])
    print(f"results: {results}")
    return exit_status(records)


if __name__ == "__main__":
    sys.exit(main())
