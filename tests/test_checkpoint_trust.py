"""No code from checkpoint files (issue 27): every entry point that opens a `.ckpt` (or a folder's
`pytorch_model.bin`) refuses a pickle that would run code, with one line naming the file and the global;
the marker file the pickle would create never appears. The project's own checkpoints (full and LoRA, as
the CLI and the Python API save them) load without any opt-in, and the opt-in runs the file as asked."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from codiemb_pl.fusion.sources import load_lightning_checkpoint
from codiemb_pl.storage.checkpoint_loading import (load_checkpoint_file, trusted_checkpoints, vet_checkpoint_location,
                                                   verify_zip_records)
from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.model.lora import LoraSettings

from malicious_checkpoints import crafted_zip_checkpoint, with_extra_object

TINY_CONFIG = Path(__file__).parent / "conf" / "tiny.yaml"
DEMO = Path(__file__).resolve().parents[1] / "codiemb_pl" / "demo"
KINDS = ["crafted_zip", "real_last_ckpt_plus_object"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """`last.ckpt` of a 2-step full fit and of a 2-step LoRA fit (`codiemb fit`, in-process)."""
    root = tmp_path_factory.mktemp("own_runs")
    paths = {}
    for name, extra in (("full", []), ("lora", ["--model.lora.r", "2", "--model.lora.alpha", "4.0"])):
        folder = root / name
        assert main(["fit", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                     "--trainer.max_steps", "2", "--trainer.default_root_dir", str(folder), *extra]) == 0
        paths[name] = folder / "checkpoints" / "last.ckpt"
    return paths


@pytest.fixture(scope="module")
def api_lora_checkpoint(runs, tmp_path_factory) -> Path:
    """The LoRA run's checkpoint as the Python API saves it: its settings objects (LoraSettings,
    SourceConfig) in the hyper-parameters instead of LightningCLI's plain dicts."""
    from codiemb_pl.data.sources import SourceConfig
    from codiemb_pl.losses.sts import STSLossConfig

    checkpoint = torch.load(runs["lora"], map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["lora"] = LoraSettings(**checkpoint["hyper_parameters"]["lora"])
    checkpoint["hyper_parameters"]["sts_loss"] = STSLossConfig()
    data = checkpoint["datamodule_hyper_parameters"]
    fields = {field.name for field in dataclasses.fields(SourceConfig)}
    data["train"] = [SourceConfig(**{k: v for k, v in source.items() if k in fields}) for source in data["train"]]
    path = tmp_path_factory.mktemp("api") / "api_lora.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code_ran"


@pytest.fixture(params=KINDS)
def malicious(request, runs, tmp_path, marker) -> Path:
    if request.param == "crafted_zip":
        return crafted_zip_checkpoint(tmp_path / "evil.ckpt", marker)
    return with_extra_object(runs["full"], tmp_path / "last.ckpt", marker)


def refusal_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def assert_refused_naming_exec(line: str, path: Path) -> None:
    assert str(path) in line and "exec" in line and "--trust-checkpoint" in line, line


def test_fuse_and_evaluate_refuse_code_in_a_checkpoint(malicious, marker, runs, tiny_model_dir, tmp_path, capsys):
    base = str(tiny_model_dir)
    for argv in (["fuse", "--base", base, "--model", str(malicious), "--method", "uniform_soup",
                  "--output", str(tmp_path / "fused")],
                 ["fuse", "--base", str(malicious), "--model", str(runs["full"]), "--method", "uniform_soup",
                  "--output", str(tmp_path / "fused")],
                 ["evaluate", "--model", str(malicious), "--base", base, "--sts", f"d={DEMO / 'sts_dev.jsonl'}"],
                 ["mine-negatives", str(DEMO / "ir_train.jsonl"), "--model", str(malicious),
                  "--output", str(tmp_path / "mined.jsonl")]):
        assert_refused_naming_exec(refusal_line(capsys, main(argv)), malicious)
        assert not marker.exists(), argv
    assert not (tmp_path / "fused").exists() and not (tmp_path / "mined.jsonl").exists()


def test_a_model_folder_whose_pytorch_model_bin_runs_code_is_refused(tiny_model_dir, tmp_path, marker, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    crafted_zip_checkpoint(folder / "pytorch_model.bin", marker)
    bin_file = folder / "pytorch_model.bin"
    for argv in (["fuse", "--base", str(tiny_model_dir), "--model", str(folder), "--method", "uniform_soup",
                  "--output", str(tmp_path / "fused")],
                 ["evaluate", "--model", str(folder), "--sts", f"d={DEMO / 'sts_dev.jsonl'}"]):
        assert_refused_naming_exec(refusal_line(capsys, main(argv)), bin_file)
        assert not marker.exists()


def test_lightning_ckpt_path_refuses_code(malicious, marker, tiny_model_dir, tmp_path, capsys):
    """`validate/test/predict --ckpt_path FILE` (LightningCLI reads its hyper-parameters first) and
    `fit --ckpt_path last` (`resume.resolve_last_checkpoint` inspects the candidates under the same rule)."""
    common = ["--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir)]
    code = main(["validate", *common, "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(malicious)])
    assert_refused_naming_exec(refusal_line(capsys, code), malicious)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(malicious, resumed / "checkpoints" / "last.ckpt")
    code = main(["fit", *common, "--trainer.default_root_dir", str(resumed), "--ckpt_path", "last"])
    line = refusal_line(capsys, code)
    assert "last.ckpt names exec" in line and "--weights_only false" in line, line
    assert not marker.exists()


def test_export_from_best_and_strategies_that_load_themselves_refuse_code(malicious, marker):
    """ExportEncoder(from_best) reading the best checkpoint; Lightning's own load through the trainer's
    CheckpointIO (`DurableCheckpointIO.load_checkpoint`); a strategy whose `load_checkpoint` bypasses the
    CheckpointIO (FSDP2Strategy: Lightning's ModelParallelStrategy), vetted by `install_safe_loading`."""
    from codiemb_pl.callbacks.export import ExportEncoder
    from codiemb_pl.training.checkpoint_io import DurableCheckpointIO, install_safe_loading
    from codiemb_pl.training.sharding import FSDP2Strategy

    for weights_only in (None, True):   # Lightning's default, and asked for
        with pytest.raises(InputError) as refused:
            DurableCheckpointIO().load_checkpoint(str(malicious), weights_only=weights_only)
        assert_refused_naming_exec(str(refused.value), malicious)

    trainer = SimpleNamespace(checkpoint_callback=SimpleNamespace(best_model_path=str(malicious)))
    with pytest.raises(InputError) as refused:
        ExportEncoder().on_fit_end(trainer, pl_module=None)
    assert_refused_naming_exec(str(refused.value), malicious)
    strategy = FSDP2Strategy()
    install_safe_loading(strategy)
    with pytest.raises(InputError) as refused:
        strategy.load_checkpoint(str(malicious))
    assert_refused_naming_exec(str(refused.value), malicious)
    assert not marker.exists()


def test_sharded_checkpoint_metadata_is_vetted(tmp_path, marker):
    """A `torch.distributed.checkpoint` folder: its `.metadata` is a plain pickle (torch reads it with
    `pickle.load`); a genuine one passes, one that runs code is refused."""
    import torch.distributed.checkpoint as dcp

    from malicious_checkpoints import RunsCode

    folder = tmp_path / "sharded"
    dcp.save({"model": {"w": torch.randn(3, 4)}, "step": 3}, checkpoint_id=str(folder), no_dist=True)
    torch.save({"global_step": 3}, folder / "meta.pt")
    vet_checkpoint_location(folder)
    import pickle

    (folder / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(InputError, match=r"\.metadata: names builtins\.exec"):
        vet_checkpoint_location(folder)
    assert not marker.exists()


def test_own_checkpoints_load_without_opt_in(runs, api_lora_checkpoint, tiny_model_dir, tmp_path, capsys):
    """Full and LoRA `last.ckpt` of `codiemb fit`, and a LoRA checkpoint holding the Python API's settings
    objects: read weights-only, fused, evaluated and validated with no flag."""
    for path in (runs["full"], runs["lora"], api_lora_checkpoint):
        checkpoint = load_lightning_checkpoint(path, mmap=True)
        assert checkpoint["global_step"] == 2 and checkpoint["state_dict"]
    assert isinstance(load_lightning_checkpoint(api_lora_checkpoint)["hyper_parameters"]["lora"], LoraSettings)
    with pytest.raises(InputError, match=r"names codiemb_pl\.[\w.]+(Settings|Config), a function or class"):
        load_checkpoint_file(api_lora_checkpoint)   # the classes are the caller's to allow
    assert main(["fuse", "--base", str(tiny_model_dir), "--model", str(runs["full"]), "--model", str(runs["lora"]),
                 "--model", str(api_lora_checkpoint), "--method", "uniform_soup", "--mixed-lora",
                 "--output", str(tmp_path / "fused")]) == 0
    assert main(["evaluate", "--model", str(api_lora_checkpoint), "--sts", f"d={DEMO / 'sts_dev.jsonl'}"]) == 0
    assert main(["validate", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(runs["full"])]) == 0
    assert "codiemb: error" not in capsys.readouterr().err


def test_opt_in_unpickles_fully(runs, tiny_model_dir, tmp_path, marker):
    """`--trust-checkpoint` (project commands) and `--weights_only false` (LightningCLI): the extra object
    is unpickled (its code runs: the marker appears) and the command completes."""
    evil = with_extra_object(runs["full"], tmp_path / "trusted.ckpt", marker)
    assert main(["fuse", "--base", str(tiny_model_dir), "--model", str(evil), "--method", "uniform_soup",
                 "--output", str(tmp_path / "fused"), "--trust-checkpoint"]) == 0
    assert marker.exists() and (tmp_path / "fused" / "model.safetensors").is_file()
    marker.unlink()
    assert main(["validate", "--config", str(TINY_CONFIG), "--model.model_name_or_path", str(tiny_model_dir),
                 "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(evil), "--weights_only", "false"]) == 0
    assert marker.exists()
    marker.unlink()
    with trusted_checkpoints():
        assert load_checkpoint_file(evil)["global_step"] == 2 and marker.exists()


def test_boom_and_sweep_take_the_opt_in(tiny_model_dir, tmp_path, marker):
    """BOOM's merge of exports (`merge_exports`, as the benchmarks call it) refuses a member that runs code;
    `codiemb boom` and `codiemb sweep` accept `--trust-checkpoint` (their members and resumes follow it)."""
    from codiemb_pl.commands.boom import collect_options
    from codiemb_pl.commands.sweep import build_parser
    from codiemb_pl.sweeps.boom import merge_exports

    evil = crafted_zip_checkpoint(tmp_path / "member.ckpt", marker)
    with pytest.raises(InputError) as refused:
        merge_exports(str(tiny_model_dir), [tiny_model_dir, evil], tmp_path / "merged")
    assert_refused_naming_exec(str(refused.value), evil)
    assert not marker.exists() and not (tmp_path / "merged").exists()
    options, _, _ = collect_options(["--config", str(TINY_CONFIG), "--output", str(tmp_path / "boom"),
                                     "--trust-checkpoint"])
    assert options["trust_checkpoint"] is True
    assert build_parser().parse_args(["--sweep", "s.yaml", "--trust-checkpoint"]).trust_checkpoint is True


def test_damaged_zip_records_are_found_by_their_crc(runs, tmp_path):
    """torch's zip reader checks no CRC (a flipped byte in the weights loads as is); ours names the record."""
    import zipfile

    damaged = tmp_path / "damaged.ckpt"
    shutil.copy(runs["full"], damaged)
    with zipfile.ZipFile(damaged) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    data_offset = largest.header_offset + 30 + len(largest.filename) + len(largest.extra)
    with open(damaged, "r+b") as handle:   # inside the record's data whatever the local extra field's size
        handle.seek(data_offset + largest.file_size // 2)
        handle.write(b"\xff" * 64)
    assert torch.load(damaged, map_location="cpu", weights_only=True)["global_step"] == 2   # torch alone: no error
    with pytest.raises(InputError, match=rf"damaged\.ckpt: the checkpoint is corrupt or truncated \(Bad CRC-32 for "
                                         rf"file '{largest.filename}'\)"):
        verify_zip_records(damaged)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(runs["full"].read_bytes()[:100_000])
    with pytest.raises(InputError, match="truncated"):
        load_checkpoint_file(truncated)


def test_the_refused_global_is_named_for_blocked_modules_too(tmp_path, marker):
    """torch words a blocked module (`os`) differently from an unlisted global; both lines name it."""
    import os

    class RunsOsSystem:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "system.ckpt"
    torch.save({"state_dict": {}, "x": RunsOsSystem()}, path)
    with pytest.raises(InputError, match=r"system\.ckpt: names posix\.system, a function or class no codiemb_pl"):
        load_checkpoint_file(path)
    assert not marker.exists()
