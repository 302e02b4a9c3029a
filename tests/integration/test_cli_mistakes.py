"""Command-line mistakes: one literal sentence, the documented exit code, nothing left behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import cli_env, run_cli

pytestmark = pytest.mark.slow


def one_line(res: object) -> str:
    stderr = res.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("error:"), stderr
    return stderr


@pytest.mark.parametrize(("args", "code", "words"), [
    (["server", "--port", "99999", "--dataset", "digits"], 2, "between 0 and 65535"),
    (["server", "--dataset", "digits", "--tls-cert", "/nonexistent.pem", "--tls-key",
      "/nonexistent.key"], 2, "cannot read TLS file"),
    (["centralized", "--dataset", "digits", "--seed", "-1"], 2, "--seed must be 0 or more"),
    (["server", "--dataset", "digits", "--seed", "-3"], 2, "--seed must be 0 or more"),
    (["run", "--dataset", "nope"], 2, "nope"),
    (["run", "--dataset", "digits", "--model", "resnet"], 2, "resnet"),
    (["run", "--dataset", "digits", "--fraction", "1.5"], 2, "--fraction"),
    (["run", "--dataset", "digits", "--strategy", "fedfoo"], 2, "fedfoo"),
    (["run", "--dataset", "digits", "--strategy", "krum:1"], 2,
     "krum:1 needs at least 5 updates a round but the run has 3 clients"),
    (["run", "--dataset", "digits", "--mode", "async", "--max-updates", "3", "--strategy",
      "fedadam"], 2, "--strategy fedadam applies to --mode sync"),
    (["sim", "--dataset", "digits", "--strategy", "norm-bounding"], 2,
     "norm-bounding needs --clip-norm C"),
    (["sim", "--dataset", "digits", "--strategy", "fedavgm", "--beta2", "0.5"], 2,
     "--beta2 applies only to fedadam or fedyogi"),
    (["run", "--dataset", "digits", "--lr", "-1"], 2, "learning rate"),
    (["run", "--dataset", "digits", "--clients", "2", "--min-results", "3"], 2,
     "--min-results 3 is more than the 2 clients"),
    (["local", "--dataset", "digits", "--partition", "dirichlet:-1:3:0"], 2, "dirichlet:-1:3:0"),
    (["sim", "--dataset", "digits", "--engine", "[/]fast"], 2, "[/]fast"),
])
def test_a_bad_command_line_is_one_sentence(
    tmp_path: Path, args: list[str], code: int, words: str,
) -> None:
    out = tmp_path / "out"
    res = run_cli([*args, "--out", str(out)], cli_env(tmp_path), timeout=120)
    assert res.returncode == code, res.stdout + res.stderr
    assert words in one_line(res)
    assert not out.exists() or not any(out.iterdir()), "a failed command left files behind"


def test_out_at_a_file_or_an_unwritable_place(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    res = run_cli(["centralized", "--dataset", "digits", "--epochs", "1", "--out", str(a_file)],
                  env)
    assert res.returncode == 4 and "is a file" in one_line(res)
    res = run_cli(["centralized", "--dataset", "digits", "--epochs", "1", "--out",
                   "/proc/fedlearn-run"], env)
    assert res.returncode == 4 and "cannot write the run directory" in one_line(res)


def test_toml_with_a_value_of_the_wrong_type_names_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "run.toml"
    conf.write_text('[server]\nrounds = "ten"\n')
    res = run_cli(["server", "--dataset", "digits", "--config", str(conf), "--out",
                   str(tmp_path / "out")], cli_env(tmp_path))
    assert res.returncode == 2
    assert "rounds" in one_line(res) and "whole number" in res.stderr


def test_a_client_pointed_at_a_wrong_url_gives_up_in_about_30_seconds(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-join-token")
    started = time.monotonic()
    res = run_cli(["client", "--server", "http://127.0.0.1:9", "--token-file", str(token),
                   "--dataset", "digits", "--partition", "iid:2:0"], cli_env(tmp_path),
                  timeout=120)
    took = time.monotonic() - started
    assert res.returncode == 5
    message = one_line(res)
    assert "http vs https" in message and "port" in message
    assert took < 60, took


def test_run_that_fails_before_round_one_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    bad_task = tmp_path / "t.py"
    bad_task.write_text("import fedlearn\nfrom torch import nn\n"
                        "task = fedlearn.Task(name='t', model=lambda: nn.Linear(4, 2))\n")
    res = run_cli(["run", "--task", f"{bad_task}:task", "--clients", "2", "--rounds", "1",
                   "--out", str(out)], cli_env(tmp_path), timeout=240)
    assert res.returncode != 0
    assert "--data" in one_line(res)
    assert not out.exists()
