"""The command line: ``rotorq --help`` is plain text, ``rotorq --version`` names the package version."""

import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rotorq", *args], capture_output=True, text=True,
                          timeout=120)


def test_help_is_plain_text_and_names_the_demo():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout
    assert ":mod:" not in result.stdout and ":func:" not in result.stdout
    assert "demo" in result.stdout
    assert "--version" in result.stdout


def test_demo_help_is_plain_text():
    result = run_cli("demo", "--help")
    assert result.returncode == 0, result.stderr
    assert "``" not in result.stdout
    assert "SmolLM2" in result.stdout


def test_version_is_the_package_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    with PYPROJECT.open("rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert result.stdout == f"rotorq {declared}\n"
    assert version("rotorq") == declared


@pytest.mark.parametrize(("args", "message"), [
    ((), "a command is required"),
    (("bogus",), "invalid choice"),
    (("demo", "--bits", "3"), "unrecognized arguments"),
])
def test_bad_arguments_exit_with_status_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""
