"""The README's "bring your own" section runs as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title: str, level: str = "##") -> str:
    text = README.read_text()
    start = text.index(f"{level} {title}")
    end = text.index("\n## ", start + len(level) + 1)
    if level != "##":
        end = min(end, text.index(f"\n{level} ", start + len(level) + 1))
    return text[start:end]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_bring_your_own_section_runs_as_written(tmp_path: Path) -> None:
    byo = section("Bring your own")
    (tmp_path / "task.py").write_text(blocks(byo, "python")[0])
    env = cli_env(tmp_path)
    res = subprocess.run([sys.executable, "task.py"], cwd=tmp_path, env=env, text=True,
                         capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    aucs = [float(v) for v in re.findall(r"[0-9.]+", res.stdout.strip().splitlines()[-1])]
    assert len(aucs) == 5 and aucs[-1] > 0.9
    commands = [line.split()[1:] for line in blocks(byo, "sh")[0].splitlines()
                if line.startswith("fedlearn sim") or line.startswith("fedlearn run")]
    assert len(commands) == 2
    for args in commands:
        done = run_cli([*args, "--out", str(tmp_path / args[0])], env, cwd=tmp_path,
                       timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "fed_auc" in (tmp_path / args[0] / "metrics.jsonl").read_text()


def test_strategies_section_runs_as_written(tmp_path: Path) -> None:
    strategies = section("Strategies", "###")
    (tmp_path / "mine.py").write_text(blocks(strategies, "python")[0])
    res = subprocess.run([sys.executable, "mine.py"], cwd=tmp_path, env=cli_env(tmp_path),
                         text=True, capture_output=True, timeout=300)
    assert res.returncode == 0, res.stderr
    accuracy = [float(v) for v in re.findall(r"[0-9.]+", res.stdout.strip().splitlines()[-1])]
    assert len(accuracy) == 3 and accuracy[-1] > accuracy[0]
    specs = {line.split("--strategy ")[1].split()[0]
             for line in blocks(strategies, "sh")[0].splitlines() if "--strategy " in line}
    assert specs == {"trimmed-mean:0.2+fedadam", "scaffold", "fedprox"}
    from fedlearn.strategies import STRATEGY_TABLE, parse_strategy

    rows = [line.split("|")[1].strip(" `") for line in strategies.splitlines()
            if line.startswith("| `")]
    assert rows == [row.name for row in STRATEGY_TABLE]
    table_needs = {line.split("|")[1].strip(" `"): line.rstrip(" |").split("|")[-1].strip()
                   for line in strategies.splitlines() if line.startswith("| `")}
    for row in STRATEGY_TABLE:
        assert table_needs[row.name] == row.needs_all, row.name
    assert parse_strategy("trimmed-mean:0.2+fedadam").needs_all
