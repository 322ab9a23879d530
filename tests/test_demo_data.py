"""The packaged demo data is exactly what `scripts/make_demo_data.py` writes from `scripts/demo_text/`,
and the package ships only the data (no generator code)."""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "codiemb_pl" / "demo"
SCRIPT = REPO / "scripts" / "make_demo_data.py"


def relative_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def test_regeneration_is_byte_identical_to_the_shipped_files(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                            check=True, timeout=120)
    assert "ir_train: 239" in result.stdout and "sts_dev: 120" in result.stdout
    regenerated = relative_files(tmp_path)
    shipped = {name: data for name, data in relative_files(DEMO).items() if name != "README.md"}
    assert sorted(regenerated) == sorted(shipped) == [
        "ir_dev/corpus.jsonl", "ir_dev/qrels/dev.tsv", "ir_dev/queries.jsonl", "ir_train.jsonl",
        "sts_dev.jsonl", "sts_train.jsonl"]
    for name, data in shipped.items():
        assert regenerated[name] == data, f"{name} differs from what scripts/make_demo_data.py writes"


def test_an_edited_building_block_changes_the_output(tmp_path):
    """The JSON text really drives the output (the comparison above cannot pass with a built-in copy)."""
    text = tmp_path / "text"
    text.mkdir()
    for source in (REPO / "scripts" / "demo_text").glob("*.json"):
        (text / source.name).write_bytes(source.read_bytes())
    families = json.loads((text / "knowledge_base.json").read_text(encoding="utf-8"))
    families[0]["train"][0]["questions"][0] = "a question nobody wrote before"
    (text / "knowledge_base.json").write_text(json.dumps(families), encoding="utf-8")
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--text", str(text)],
                   capture_output=True, check=True, timeout=120)
    queries = [json.loads(line)["query"] for line in (tmp_path / "out" / "ir_train.jsonl").read_text().splitlines()]
    assert "a question nobody wrote before" in queries
    assert (tmp_path / "out" / "sts_train.jsonl").read_bytes() == (DEMO / "sts_train.jsonl").read_bytes()


def test_a_passage_with_the_wrong_number_of_questions_is_named(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for source in (REPO / "scripts" / "demo_text").glob("*.json"):
        (text / source.name).write_bytes(source.read_bytes())
    families = json.loads((text / "knowledge_base.json").read_text(encoding="utf-8"))
    families[0]["dev"][0]["questions"].append("a second question")
    (text / "knowledge_base.json").write_text(json.dumps(families), encoding="utf-8")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--text", str(text)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert f"family {families[0]['key']!r}, dev passage {families[0]['dev'][0]['title']!r} has 2 questions" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_package_ships_the_demo_data_and_no_generator():
    assert not list(DEMO.rglob("*.py")), "the demo folder holds data only; the generator lives in scripts/"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["codiemb_pl"]
    for name in relative_files(DEMO):
        assert any(fnmatch.fnmatch(f"demo/{name}", pattern) for pattern in patterns), f"demo/{name} is not shipped"


@pytest.mark.parametrize("name", ["ir_train.jsonl", "sts_train.jsonl", "ir_dev"])
def test_packaged_locations_still_resolve(name):
    from codiemb_pl.paths import resolve_location

    assert Path(resolve_location(f"pkg://codiemb_pl/demo/{name}")) == DEMO / name
