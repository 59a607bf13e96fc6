"""The lock (requirements/) agrees with pyproject.toml, and the check says so only when it does."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("lock_check", ROOT / "requirements" / "check.py")
check = sys.modules["lock_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


@pytest.mark.parametrize(("lock", "extras"), sorted(check.LOCKS.items()))
def test_every_lock_agrees_with_pyproject(lock, extras):
    assert check.lock_problems(ROOT / "pyproject.toml", ROOT / "requirements" / lock, extras) == []


def test_every_lock_pins_with_hashes():
    for lock in check.LOCKS:
        text = (ROOT / "requirements" / lock).read_text()
        pins = [line for line in text.splitlines() if check._PIN.match(line)]
        assert pins and all(line.endswith("\\") for line in pins), lock  # a --hash follows
        assert text.count("--hash=sha256:") >= len(pins)


def test_a_changed_pin_in_pyproject_is_caught(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    assert '"peft==0.21.2"' in text
    pyproject.write_text(text.replace('"peft==0.21.2"', '"peft==0.22.0"'))
    problems = check.lock_problems(pyproject, ROOT / "requirements" / "dev.txt", ("cpu", "dev"))
    assert problems == ["dev.txt: peft==0.21.2 does not satisfy peft==0.22.0"]


def test_added_and_removed_requirements_are_caught(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    text = (ROOT / "pyproject.toml").read_text()
    pyproject.write_text(text.replace('"uvloop>=0.21",', '"left-pad>=1",'))
    problems = check.lock_problems(pyproject, ROOT / "requirements" / "cpu.txt", ("cpu",))
    assert "cpu.txt: left-pad>=1 is required by pyproject.toml but not locked" in problems
    assert "cpu.txt: uvloop is locked for pyproject.toml, no longer asked" in problems


def test_a_package_nothing_needs_is_caught(tmp_path):
    lock = tmp_path / "cpu.txt"
    shutil.copy(ROOT / "requirements" / "cpu.txt", lock)
    with lock.open("a") as f:
        f.write("orphan==1.0 \\\n    --hash=sha256:00\n    # via nothing-locked\n")
    problems = check.lock_problems(ROOT / "pyproject.toml", lock, ("cpu",))
    assert problems == ["cpu.txt: nothing locked needs orphan any more"]


def test_the_installed_environment_is_the_lock(monkeypatch):
    """`make test` runs this check first; here it must hold for the running interpreter, also
    when sys.path holds copies vendored inside a package (setuptools' once it is imported)."""
    import setuptools

    vendored = Path(setuptools.__file__).parent / "_vendor"
    assert any(vendored.glob("*.dist-info"))
    monkeypatch.syspath_prepend(str(vendored))
    locks = [ROOT / "requirements" / "dev.txt", ROOT / "requirements" / "uv.txt"]
    assert check.env_problems(locks) == []


def test_an_environment_that_differs_from_the_lock_is_caught(tmp_path):
    lock = tmp_path / "dev.txt"
    text = (ROOT / "requirements" / "dev.txt").read_text()
    lock.write_text(text.replace("\npeft==0.21.2 ", "\npeft==0.21.1 "))
    problems = check.env_problems([lock, ROOT / "requirements" / "uv.txt"])
    assert problems == ["peft 0.21.2 is installed, the lock has 0.21.1"]
    problems = check.env_problems([ROOT / "requirements" / "dev.txt"])  # uv's own lock left out
    assert problems == ["uv 0.13.9 is installed but not locked"]
