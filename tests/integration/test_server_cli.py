"""``fedlearn server`` refuses bad settings with one sentence, before listening."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cli_env, run_cli


def test_config_file_unknown_key_and_bad_toml(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    bad_key = tmp_path / "bad.toml"
    bad_key.write_text('dataset = "digits"\nrouns = 3\n')
    res = run_cli(["server", "--port", "0", "--config", str(bad_key)], env)
    assert res.returncode == 2 and "rouns" in res.stderr and "Traceback" not in res.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3\n")
    res = run_cli(["server", "--port", "0", "--config", str(broken)], env)
    assert res.returncode == 2 and "not valid TOML" in res.stderr
    res = run_cli(["server", "--port", "0", "--config", str(tmp_path / "none.toml")], env)
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_bad_flags(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    for args, word in [
        (["--dataset", "digits", "--fraction", "1.5"], "--fraction"),
        (["--dataset", "digits", "--rounds", "0"], "--rounds"),
        (["--dataset", "digits", "--strategy", "krum:x"], "krum in 'krum:x' needs F"),
        (["--dataset", "digits", "--strategy", "fedavg", "--tau", "0.1"], "--tau applies only"),
        (["--dataset", "digits", "--model", "cifar-cnn"], "cifar-cnn"),
        (["--dataset", "digits", "--tls-cert", "x.pem"], "--tls-key"),
    ]:
        res = run_cli(["server", "--port", "0", "--out", str(tmp_path / "r"), *args], env)
        assert res.returncode != 0, args
        assert word in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)


def test_resume_refuses_new_settings_and_non_runs(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    res = run_cli(["server", "--resume", str(tmp_path), "--rounds", "5"], env)
    assert res.returncode == 2 and "--rounds" in res.stderr
    res = run_cli(["server", "--resume", str(tmp_path)], env)
    assert res.returncode == 4 and "not a run directory" in res.stderr


def test_client_without_server_gives_up_clearly(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abcdefghijkl\n")
    res = run_cli(["client", "--server", "http://127.0.0.1:9", "--token-file", str(token),
                   "--dataset", "digits", "--partition", "iid:2:0", "--max-retries", "1",
                   "--max-wait", "0.1"], cli_env(tmp_path), timeout=60)
    assert res.returncode == 5
    assert "could not reach a fedlearn server" in res.stderr and "Traceback" not in res.stderr
