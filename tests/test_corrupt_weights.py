"""Damaged weight files and non-finite weights (issue 27): one line naming the file (and the tensor), exit
code 2, nothing written; never a repair. 4 KB of 0xFF inside the weights is 1 024 float32 NaNs: before
issue 27 `codiemb fuse` wrote them into its output and `codiemb evaluate` printed normal-looking scores."""

from __future__ import annotations

import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from codiemb_pl.cli.main import main
from codiemb_pl.errors import InputError
from codiemb_pl.fusion.writer import save_state_dict
from codiemb_pl.model.encoder import TextEncoder
from codiemb_pl.storage.weight_checks import check_safetensors_file, read_safetensors_header

DEMO = Path(__file__).resolve().parents[1] / "codiemb_pl" / "demo"
FF_BYTES = 4096
EMBEDDINGS = "embeddings.word_embeddings.weight"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A sentence-transformers base folder, a fine-tuned copy of it and a Lightning-style `.ckpt` of another."""
    root = tmp_path_factory.mktemp("weights")
    TextEncoder(str(tiny_model_dir)).save(root / "base")
    encoder = TextEncoder(str(root / "base"))
    with torch.no_grad():
        for parameter in encoder.model.parameters():
            parameter.add_(0.001)
    encoder.save(root / "tuned")
    torch.save({"state_dict": {f"encoder.{key}": value for key, value in encoder.state_dict().items()},
                "hyper_parameters": {"model_name_or_path": str(root / "base")}, "global_step": 2}, root / "run.ckpt")
    return {"base": root / "base", "tuned": root / "tuned", "ckpt": root / "run.ckpt"}


def ff_in_safetensors(folder: Path, into: Path) -> Path:
    """A copy of `folder` whose model.safetensors has 4 KB of 0xFF in the middle of the word embeddings."""
    shutil.copytree(folder, into)
    file = into / "model.safetensors"
    data_start, header = read_safetensors_header(file)
    first, last = header[EMBEDDINGS]["data_offsets"]
    with open(file, "r+b") as handle:
        handle.seek(data_start + (first + last) // 2)
        handle.write(b"\xff" * FF_BYTES)
    return into


def ff_in_ckpt(checkpoint: Path, into: Path) -> Path:
    """A copy of a `.ckpt` with 4 KB of 0xFF in the middle of its largest tensor record."""
    shutil.copy(checkpoint, into)
    with zipfile.ZipFile(into) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    with open(into, "r+b") as handle:
        handle.seek(largest.header_offset + 30 + len(largest.filename) + len(largest.extra) + largest.file_size // 2)
        handle.write(b"\xff" * FF_BYTES)
    return into


def one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("codiemb: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def fuse(*models: Path, base: Path, out: Path) -> int:
    return main(["fuse", "--base", str(base), *[arg for m in models for arg in ("--model", str(m))],
                 "--method", "uniform_soup", "--output", str(out)])


def evaluate(model: Path) -> int:
    return main(["evaluate", "--model", str(model), "--sts", f"d={DEMO / 'sts_dev.jsonl'}"])


def test_ff_bytes_in_safetensors_weights_stop_fuse_and_evaluate(family, tmp_path, capsys):
    damaged = ff_in_safetensors(family["tuned"], tmp_path / "damaged")
    weights = damaged / "model.safetensors"
    line = one_error_line(capsys, fuse(damaged, base=family["base"], out=tmp_path / "fused"))
    assert str(weights) in line and EMBEDDINGS in line and "1024 non-finite" in line
    assert not (tmp_path / "fused").exists() and not list(tmp_path.glob(".fused*"))
    line = one_error_line(capsys, evaluate(damaged))
    assert str(weights) in line and EMBEDDINGS in line and "1024 non-finite" in line


def test_ff_bytes_in_a_ckpt_fail_its_crc_in_fuse_and_evaluate(family, tmp_path, capsys):
    damaged = ff_in_ckpt(family["ckpt"], tmp_path / "damaged.ckpt")
    for run in (lambda: fuse(damaged, base=family["base"], out=tmp_path / "fused"), lambda: evaluate(damaged)):
        line = one_error_line(capsys, run())
        assert str(damaged) in line and "Bad CRC-32" in line
    assert not (tmp_path / "fused").exists()


@pytest.mark.parametrize("damage, words", [
    ("truncate", "is truncated"), ("garble_header", "not a safetensors file"), ("empty", "not a safetensors file"),
    ("pad", "bytes after its last tensor"), ("bad_config", "config.json: is not valid JSON"),
    ("no_weights", "no weights")])
def test_a_broken_model_folder_is_one_line_naming_the_file(family, tmp_path, capsys, damage, words):
    folder = tmp_path / "model"
    shutil.copytree(family["tuned"], folder)
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(content[: len(content) // 2])
    elif damage == "garble_header":
        weights.write_bytes(content[:10] + b"\xff" * 50 + content[60:])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "pad":
        weights.write_bytes(content + b"\0" * 8)
    elif damage == "bad_config":
        (folder / "config.json").write_text("{not json")
    else:
        weights.unlink()
    line = one_error_line(capsys, evaluate(folder))
    assert words in line and str(folder) in line
    line = one_error_line(capsys, fuse(folder, base=family["base"], out=tmp_path / "fused"))
    assert words in line or damage == "no_weights", line
    assert not (tmp_path / "fused").exists()


def test_safetensors_tiling_is_checked(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(2, 3), "b": torch.zeros(4)}, str(good))
    data_start, header = check_safetensors_file(good)
    assert set(header) == {"a", "b"} and data_start + 6 * 4 + 4 * 4 == good.stat().st_size
    raw = good.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8:8 + length])
    entries["b"]["data_offsets"] = [entries["a"]["data_offsets"][0], entries["a"]["data_offsets"][0] + 16]
    text = json.dumps(entries, separators=(",", ":")).encode()
    assert len(text) <= length
    text += b" " * (length - len(text))
    overlapping = tmp_path / "overlap.safetensors"
    overlapping.write_bytes(raw[:8] + text + raw[8 + length:])
    with pytest.raises(InputError, match="overlapping or missing data"):
        check_safetensors_file(overlapping)


def test_non_finite_weights_are_never_written(family, tmp_path):
    """The merge writer (every fused output and fusion snapshot) and an export refuse NaN / inf, naming the
    tensor; no file or folder appears under the name."""
    from codiemb_pl.fusion.engine import merge_state_dicts

    out = tmp_path / "merged.safetensors"
    with pytest.raises(InputError, match=rf"merged\.safetensors: tensor 'w' holds 1 non-finite"):
        save_state_dict({"w": torch.tensor([1.0, math.inf]), "b": torch.ones(2)}, out)
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    with pytest.raises(InputError, match=r"models\[0\]: tensor 'w' holds 2 non-finite"):
        merge_state_dicts({"w": torch.zeros(3)}, [{"w": torch.tensor([0.0, math.nan, math.nan])}], "uniform_soup")
    encoder = TextEncoder(str(family["base"]))
    with torch.no_grad():
        encoder.model.embeddings.word_embeddings.weight[3, :2] = math.nan
    with pytest.raises(InputError, match=rf"export: tensor '{EMBEDDINGS}' holds 2 non-finite"):
        encoder.save(tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.complex64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_found_in_every_float_dtype(dtype, bad):
    from codiemb_pl.storage.weight_checks import check_finite

    with pytest.raises(InputError, match="f: tensor 'k' holds 1 non-finite"):
        check_finite(torch.tensor([0.5, bad, 1.0]).to(dtype), "f", "k")
    finite = torch.tensor([[0.5, -2.0], [1.0, 0.0]]).to(dtype)
    assert check_finite(finite, "f", "k") is finite


def test_resume_passes_over_a_last_ckpt_that_fails_its_crc(tmp_path):
    """`--ckpt_path last` resumes from the newest checkpoint whose records pass their CRC: a `last.ckpt` with a
    damaged tensor record (which torch would load as is) is passed over, saying why."""
    from codiemb_pl.training.resume import resolve_last_checkpoint

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in (("epoch0.ckpt", 4), ("last.ckpt", 8)):
        torch.save({"global_step": step, "optimizer_states": [{}], "loops": {"fit_loop": {}},
                    "state_dict": {"w": torch.full((4096,), float(step))}}, folder / name)
    assert resolve_last_checkpoint([folder]) == (folder / "last.ckpt", "")
    ff_in_ckpt(folder / "last.ckpt", tmp_path / "damaged.ckpt")
    shutil.move(tmp_path / "damaged.ckpt", folder / "last.ckpt")
    path, line = resolve_last_checkpoint([folder])
    assert path == folder / "epoch0.ckpt" and "last.ckpt is damaged" in line and "Bad CRC-32" in line, line


def test_snapshot_files_are_read_checked(tmp_path):
    """`load_safetensors` (CheckpointFusion's snapshots, Self Positioning's θ0): damaged or non-finite is one
    InputError naming the file (and the tensor)."""
    from codiemb_pl.storage.weight_checks import load_safetensors

    good = tmp_path / "step2.safetensors"
    save_file({"w": torch.ones(64), "b": torch.zeros(2)}, str(good))
    assert torch.equal(load_safetensors(good)["w"], torch.ones(64))
    nan = tmp_path / "nan.safetensors"
    save_file({"w": torch.tensor([1.0, math.nan])}, str(nan))
    with pytest.raises(InputError, match=r"nan\.safetensors: tensor 'w' holds 1 non-finite"):
        load_safetensors(nan)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"cut\.safetensors: is truncated"):
        load_safetensors(cut)
