"""The README and the getting-started page run as written, and the Markdown stays short.

Every fenced `bash` block of `README.md` and `docs/getting-started.md` is run in a fresh folder that holds
`configs/` and `codiemb_pl/` (as a clone does): install lines and the test command are skipped (CI runs them), a
`codiemb` command runs in this process with a tiny-budget override (the tiny random BERT instead of MiniLM, 2
training batches an epoch), and any other shell line (writing the example data) runs in bash. Each command must
end with exit code 0 and leave the outputs the pages promise.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from codiemb_pl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", ROOT / "docs" / "getting-started.md")
SKIPPED = ("pip install", "python -m pytest")   # what CI's own install and test step runs
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
README_LINES, README_CHARS, MARKDOWN_LINES = 250, 20_000, 400


def shell_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text("utf-8"))


def steps(block: str) -> list[tuple[str, str]]:
    """A block as ("codiemb", command) and ("shell", script) steps, in order; skipped parts left out.
    Continued lines are joined, `a && b` chains split, heredocs stay with the line that opens them."""
    lines, out, shell = block.replace("\\\n", " ").splitlines(), [], []
    index = 0
    while index < len(lines):
        line = lines[index].split("  #", 1)[0].strip() if "<<" not in lines[index] else lines[index]
        index += 1
        if "<<" in line:   # a heredoc: keep every line up to its terminator
            end = line.split("<<", 1)[1].strip().strip("'\"")
            while index < len(lines) and lines[index].strip() != end:
                line += "\n" + lines[index]
                index += 1
            line += "\n" + end
            index += 1
        for part in ([p.strip() for p in line.split("&&")] if "<<" not in line else [line]):
            if not part or part.startswith("#") or part.startswith(SKIPPED):
                continue
            if part.startswith("codiemb "):
                if shell:
                    out.append(("shell", "\n".join(shell)))
                    shell = []
                out.append(("codiemb", part))
            else:
                shell.append(part)
    if shell:
        out.append(("shell", "\n".join(shell)))
    return out


def documented_steps() -> list[tuple[str, str]]:
    """Every step of every page, each distinct step once, in page order."""
    seen, ordered = set(), []
    for page in PAGES:
        for block in shell_blocks(page):
            for step in steps(block):
                if step not in seen:
                    seen.add(step)
                    ordered.append(step)
    return ordered


def tiny_budget(argv: list[str], tiny_model: Path) -> list[str]:
    """The overrides that make a documented command cheap: a tiny model and 2 training batches an epoch."""
    if argv[0] == "fit":
        return ["--model.model_name_or_path", str(tiny_model), "--trainer.limit_train_batches", "2"]
    return []


def check_outputs(argv: list[str], cwd: Path) -> None:
    """The outputs the pages promise for a fit (model/, fusion/model/, checkpoints/, logs/ under its root) or an
    evaluation (the --output JSON with a metric per named set)."""
    if argv[0] == "fit":
        config = yaml.safe_load((cwd / argv[argv.index("--config") + 1]).read_text("utf-8"))
        root = cwd / config["trainer"]["default_root_dir"]
        for promised in ("model/modules.json", "model/README.md", "fusion/model/modules.json",
                         "fusion/leaderboard.json", "checkpoints/last.ckpt", "logs"):
            assert (root / promised).exists(), f"{' '.join(argv)}: no {promised}"
    elif argv[0] == "evaluate":
        import json

        scores = json.loads((cwd / argv[argv.index("--output") + 1]).read_text("utf-8"))
        names = [value.split("=", 1)[0] for flag, value in zip(argv, argv[1:]) if flag in ("--sts", "--ir")]
        assert sorted(scores) == sorted(names)
        assert all(0.0 <= next(iter(metrics.values())) <= 1.0 for metrics in scores.values())


def test_pages_hold_the_commands_ci_and_users_run():
    """The README keeps the install + quickstart and install + tests commands (`.ci/run` calls the latter
    verbatim), and both pages hold runnable `codiemb` commands."""
    readme = (ROOT / "README.md").read_text("utf-8")
    ci = (ROOT / ".ci" / "run").read_text("utf-8")
    test_command = 'pip install "torch==2.13.0" -e ".[dev]" && python -m pytest -q -n 2'
    assert test_command in readme and test_command in ci
    assert 'pip install "torch==2.13.0" -e ".[demo]" && codiemb fit --config configs/quickstart.yaml' in readme
    assert "mkdocs build --strict" in ci and '".[docs]"' in ci
    commands = [command for kind, command in documented_steps() if kind == "codiemb"]
    assert "codiemb fit --config configs/quickstart.yaml" in commands
    assert any(c.startswith("codiemb fit --config configs/my_data.yaml") for c in commands)
    assert any(c.startswith("codiemb evaluate") for c in commands)


def test_every_documented_command_runs(tiny_model_dir, tmp_path, monkeypatch, one_torch_thread):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "codiemb_pl").symlink_to(ROOT / "codiemb_pl")
    monkeypatch.chdir(tmp_path)
    env = {**os.environ, "PATH": os.environ.get("PATH", "")}
    ran = []
    for kind, command in documented_steps():
        if kind == "shell":
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, env=env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{command}\n{done.stderr}"
            continue
        argv = shlex.split(command)[1:]
        code = main(argv + tiny_budget(argv, tiny_model_dir))
        assert code == 0, f"{command} ended with exit code {code}"
        check_outputs(argv, tmp_path)
        ran.append(argv[0])
    assert ran.count("fit") >= 2 and "evaluate" in ran


def test_readme_and_every_markdown_file_stay_short():
    readme = (ROOT / "README.md").read_text("utf-8")
    assert len(readme.splitlines()) <= README_LINES and len(readme) <= README_CHARS
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    pages = [ROOT / name for name in tracked] or list(ROOT.glob("**/*.md"))
    long = {str(p.relative_to(ROOT)): n for p in pages if p.is_file()
            and (n := len(p.read_text("utf-8").splitlines())) > MARKDOWN_LINES}
    assert long == {}


@pytest.mark.parametrize("block, expected", [
    ('pip install "torch==2.13.0" -e ".[demo]" && codiemb fit --config c.yaml\n',
     [("codiemb", "codiemb fit --config c.yaml")]),
    ("codiemb evaluate --model m \\\n    --sts a=b  # a comment\n", [("codiemb", "codiemb evaluate --model m      --sts a=b")]),
    ("mkdir -p data\ncat > data/x.jsonl <<'EOF'\n{\"a\": 1}\nEOF\ncodiemb fit --config c.yaml\n",
     [("shell", "mkdir -p data\ncat > data/x.jsonl <<'EOF'\n{\"a\": 1}\nEOF"), ("codiemb", "codiemb fit --config c.yaml")]),
])
def test_steps_split_blocks_as_a_shell_would(block, expected):
    assert steps(block) == expected
