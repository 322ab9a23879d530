"""The GPU check's own step programs (`benchmarks/gpu_check.py` runs each in a subprocess).

    python benchmarks/gpu_check_steps.py environment --json F      # GPU, driver, torch/CUDA, package versions
    python benchmarks/gpu_check_steps.py preflight --json F --modules a,b --node-ids ID...  # imports, collection
    python benchmarks/gpu_check_steps.py build-models --minilm DIR --out DIR --json F     # random models
    python benchmarks/gpu_check_steps.py lora-fit --decoder DIR --work DIR --json F        # bf16 LoRA fit
                                                     [--device cpu]   # the same fit on the CPU (to try it)

Each writes its findings to `--json` and exits 1 when a check fails (the reasons are in the JSON, one line
each, under "problems").
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
PACKAGES = ("torch", "lightning", "pytorch-lightning", "transformers", "tokenizers", "safetensors",
            "sentence-transformers", "peft", "accelerate", "deepspeed", "datasets", "jsonargparse", "pyarrow",
            "numpy", "torchmetrics", "pytest", "pydantic", "triton")
TEXTS = ["a short one", "a somewhat longer sentence about retrieval", "mid length text"]
LORA = {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": "all-linear"}


def write(path: str, record: dict) -> int:
    Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 1 if record.get("problems") else 0


def environment(args) -> int:
    """Where the check ran: GPU (nvidia-smi), torch and CUDA, package versions and where each was loaded from."""
    record: dict = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
                    "cpus": os.cpu_count(), "problems": []}
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        record["memory_gib"] = round(int(meminfo.read_text().split()[1]) / 2**20, 1)
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"]
        record["nvidia_smi_query"] = subprocess.run(query, capture_output=True, text=True).stdout.strip()
        record["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    else:
        record["nvidia_smi"] = None
    import torch

    cuda = torch.cuda.is_available()
    record["torch"] = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
                       "cudnn": torch.backends.cudnn.version() if cuda else None,
                       "devices": torch.cuda.device_count() if cuda else 0}
    if cuda:
        record["torch"].update(device=torch.cuda.get_device_name(0),
                               capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                               bf16=torch.cuda.is_bf16_supported(),
                               nccl=".".join(map(str, torch.cuda.nccl.version())))
    else:
        record["problems"].append("torch.cuda.is_available() is False: no GPU visible to torch")
    site = Path(args.site).resolve() if args.site else None
    record["packages"] = {}
    for name in PACKAGES:
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            record["packages"][name] = None
            continue
        location = Path(str(distribution.locate_file(""))).resolve()
        carried = site is not None and (location == site or site in location.parents)
        record["packages"][name] = distribution.version + (" (carried wheel)" if carried else "")
    return write(args.json, record)


def preflight(args) -> int:
    """Import every module named, then collect the pytest node ids (each must resolve to one test)."""
    problems = []
    for module in filter(None, args.modules.split(",")):
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - any import failure is the finding
            problems.append(f"import {module}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    collected: list[str] = []
    if args.node_ids:
        import pytest

        class Collector:
            def pytest_collection_finish(self, session):
                collected.extend(item.nodeid for item in session.items)

        os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # collection needs no third-party plugin, hence
        # no addopts either (the project's `--dist loadfile` belongs to pytest-xdist)
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", str(REPO), *args.node_ids],
                           plugins=[Collector()])
        for node_id in args.node_ids:
            if node_id not in collected:
                problems.append(f"{node_id}: pytest does not collect it (collection exit {int(code)})")
    return write(args.json, {"modules": list(filter(None, args.modules.split(","))), "collected": collected, "problems": problems})


def build_models(args) -> int:
    """A BERT of all-MiniLM-L6-v2's shape with random weights (its config and tokenizer from `--minilm`), and
    the tiny random Qwen2 decoder of the LoRA tests (hidden 128)."""
    import torch
    from transformers import BertConfig, BertModel

    sys.path.insert(0, str(TESTS))
    from decoder_models import build_tiny_decoder

    out = Path(args.out)
    minilm = out / "minilm_random"
    shutil.copytree(args.minilm, minilm, dirs_exist_ok=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig.from_pretrained(args.minilm))
    model.save_pretrained(minilm)
    decoder = build_tiny_decoder(out / "qwen2_tiny", "qwen2", hidden=128)
    return write(args.json, {"minilm_random": str(minilm), "minilm_parameters": sum(p.numel() for p in model.parameters()),
                             "qwen2_tiny": str(decoder), "problems": []})


def lora_fit(args) -> int:
    """`codiemb fit` of the tiny decoder with LoRA in bf16-mixed on the GPU (IR + STS demo data, validation,
    checkpoint, export of the best checkpoint), then: every training loss finite, the export loads in
    `TextEncoder` and sentence-transformers on `--device` with the same finite embeddings, the merged export
    differs from the base weights, the adapters alone were written."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(TESTS))
    from codiemb_pl.cli.main import main

    work = Path(args.work)
    model_dir, adapter_dir, losses_dir = work / "model", work / "adapter", work / "losses"
    code = main(["fit", "--config", str(TESTS / "conf" / "tiny.yaml"), "--model.model_name_or_path", args.decoder,
                 "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
                 "--trainer.max_steps", str(args.steps), "--trainer.default_root_dir", str(work / "run"),
                 "--model.lr", "1e-3", "--model.lora", json.dumps(LORA),
                 "--trainer.callbacks+=ddp_driver.probes.LossRecorder", f"--trainer.callbacks.out_dir={losses_dir}",
                 "--trainer.callbacks+=codiemb_pl.callbacks.ExportEncoder", f"--trainer.callbacks.dirpath={model_dir}",
                 f"--trainer.callbacks.adapter_dirpath={adapter_dir}"])
    record: dict = {"exit": code, "problems": []}
    problems = record["problems"]
    if code != 0:
        problems.append(f"codiemb fit exited {code}")
        return write(args.json, record)
    losses = [loss for _, loss in json.loads((losses_dir / "losses_rank0.json").read_text())]
    record["losses"] = losses
    if len(losses) != args.steps or not all(loss is not None and math.isfinite(loss) for loss in losses):
        problems.append(f"training losses not {args.steps} finite values: {losses}")
    from sentence_transformers import SentenceTransformer

    from codiemb_pl.model.encoder import TextEncoder

    ours = TextEncoder(str(model_dir)).to(args.device).encode(TEXTS)
    theirs = SentenceTransformer(str(model_dir), device=args.device).encode(TEXTS, convert_to_tensor=True).float().cpu()
    record["embedding_shape"] = list(ours.shape)
    record["max_abs_difference_vs_sentence_transformers"] = float((ours - theirs).abs().max())
    if not torch.isfinite(ours).all():
        problems.append("the export's embeddings are not finite")
    if not torch.allclose(ours, theirs, atol=1e-4):
        problems.append(f"TextEncoder and sentence-transformers embeddings of the export differ by "
                        f"{record['max_abs_difference_vs_sentence_transformers']:.2e} (> 1e-4)")
    exported, base = load_file(str(model_dir / "model.safetensors")), load_file(str(Path(args.decoder) / "model.safetensors"))
    if any("lora" in key for key in exported):
        problems.append("the merged export still holds LoRA tensors")
    moved = [key for key in base if key in exported and not torch.equal(exported[key].float(), base[key].float())]
    record["tensors_moved"] = len(moved)
    if not moved:
        problems.append("the export equals the base weights: the adapters did not train or were not merged")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        problems.append(f"{adapter_dir / 'adapter_model.safetensors'}: the adapters alone were not written")
    return write(args.json, record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("environment")
    command.add_argument("--json", required=True)
    command.add_argument("--site", help="folder the carried wheels were installed into")
    command = commands.add_parser("preflight")
    command.add_argument("--json", required=True)
    command.add_argument("--modules", default="")
    command.add_argument("--node-ids", nargs="*", default=[])
    command = commands.add_parser("build-models")
    command.add_argument("--minilm", required=True)
    command.add_argument("--out", required=True)
    command.add_argument("--json", required=True)
    command = commands.add_parser("lora-fit")
    command.add_argument("--decoder", required=True)
    command.add_argument("--work", required=True)
    command.add_argument("--json", required=True)
    command.add_argument("--steps", type=int, default=8)
    command.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args(argv)
    return {"environment": environment, "preflight": preflight, "build-models": build_models,
            "lora-fit": lora_fit}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
