"""The install files agree with each other and with the README's quick start."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONDA_NAMES = {"torch": "pytorch"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].strip().lower()


def test_every_runtime_dependency_is_in_environment_yml():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = (ROOT / "environment.yml").read_text().lower()
    listed = {_name(line.strip().lstrip("-").strip()) for line in env.splitlines() if line.strip().startswith("-")}
    missing = [d for d in deps if CONDA_NAMES.get(_name(d), _name(d)) not in listed]
    assert not missing, f"environment.yml lacks {missing}"
    assert "-e ." in env  # the project itself, through pip


def test_readme_quick_start_is_two_make_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    assert [line.strip() for line in block.splitlines()[1:] if line.strip()] == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_console_script_and_codec_entry_point_are_installed():
    from importlib.metadata import entry_points

    assert any(ep.name == "hlss" for ep in entry_points(group="console_scripts"))
    assert any(ep.name == "hlss.jpeg" for ep in entry_points(group="zarr.codecs"))
    out = subprocess.run([sys.executable, "-m", "hlss", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "tile" in out.stdout and "demo-cohort" in out.stdout and "info" in out.stdout


def test_the_hlss_command_is_the_hlss_package():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["hlss"] == "hlss.cli:main"
    assert "hlss*" in project["tool"]["setuptools"]["packages"]["find"]["include"]


def test_license_is_apache_2():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
