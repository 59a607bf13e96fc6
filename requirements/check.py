"""Checks that keep the lock honest, offline and in seconds.

`check.py lock`: pyproject.toml and the locks agree. Every direct requirement of each lock's
extras is pinned there at a version it allows, every package the lock says comes from
pyproject.toml is still asked for there, and every other pinned package is still wanted by
some pinned package (uv's `# via` annotations), so a lock left behind by an edit fails.

`check.py env LOCK...`: the running interpreter's installed distributions are exactly the locks'
pins (plus loraplex itself and the venv's own pip), so `make test` stops before running on a
stack CI never saw.
"""

from __future__ import annotations

import re
import sys
import sysconfig
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "loraplex"
# lock file -> the pyproject extras it was compiled with (see the Makefile's `lock` target).
LOCKS = {"cpu.txt": ("cpu",), "dev.txt": ("cpu", "dev"), "gpu.txt": ("gpu",)}
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
_VIA_ONE = re.compile(r"^\s+# via (.+)$")
_VIA_MANY = re.compile(r"^\s+#   (.+)$")


@dataclass
class Pin:
    version: str
    via: set[str] = field(default_factory=set)


def read_lock(path: Path) -> dict[str, Pin]:
    """name -> pinned version and the packages (or `loraplex`) that want it."""
    pins: dict[str, Pin] = {}
    current: Pin | None = None
    for line in path.read_text().splitlines():
        if m := _PIN.match(line):
            current = pins[canonicalize_name(m[1])] = Pin(m[2])
        elif current is not None and (m := _VIA_ONE.match(line) or _VIA_MANY.match(line)):
            for who in m[1].split(","):
                who = who.strip()
                if who and who != "via":
                    current.via.add(PROJECT if "pyproject.toml" in who else canonicalize_name(who))
    return pins


def excluded() -> set[str]:
    lines = (ROOT / "requirements" / "excludes.txt").read_text().splitlines()
    return {canonicalize_name(x) for x in lines if x.strip() and not x.startswith("#")}


def direct_requirements(pyproject: Path, extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return reqs


def lock_problems(pyproject: Path, lock: Path, extras: tuple[str, ...]) -> list[str]:
    """Where pyproject.toml and one lock disagree; empty when they agree."""
    pins = read_lock(lock)
    env = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}
    problems = []
    wanted = set()
    for req in direct_requirements(pyproject, extras):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        wanted.add(name)
        pin = pins.get(name)
        if pin is None:
            problems.append(f"{lock.name}: {req} is required by pyproject.toml but not locked")
        elif not req.specifier.contains(Version(pin.version), prereleases=True):
            problems.append(f"{lock.name}: {name}=={pin.version} does not satisfy {req}")
    for name, pin in sorted(pins.items()):
        if PROJECT in pin.via and name not in wanted:
            problems.append(f"{lock.name}: {name} is locked for pyproject.toml, no longer asked")
        if not (pin.via & (set(pins) | {PROJECT})):
            problems.append(f"{lock.name}: nothing locked needs {name} any more")
    if lock.name != "gpu.txt":
        problems += [f"{lock.name}: {n} is excluded but locked" for n in excluded() & set(pins)]
    return problems


def env_problems(locks: list[Path]) -> list[str]:
    """Where the installed distributions differ from the locks; empty when they match."""
    pins = {name: pin for lock in locks for name, pin in read_lock(lock).items()}
    # The environment's own site-packages only: sys.path may also hold copies vendored inside
    # packages (setuptools puts its _vendor folder there once imported).
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {
        canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=paths)
    }
    problems = []
    for name, pin in sorted(pins.items()):
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}=={pin.version} is locked but not installed")
        elif Version(have) != Version(pin.version):
            problems.append(f"{name} {have} is installed, the lock has {pin.version}")
    extra = set(installed) - set(pins) - {PROJECT, "pip"}
    problems += [f"{name} {installed[name]} is installed but not locked" for name in sorted(extra)]
    return problems


def main(argv: list[str]) -> int:
    if argv[:1] == ["lock"]:
        pyproject = ROOT / "pyproject.toml"
        problems = [
            p
            for name, extras in LOCKS.items()
            for p in lock_problems(pyproject, ROOT / "requirements" / name, extras)
        ]
        fix = "pyproject.toml and requirements/ disagree: run `make lock` and commit the result"
    elif argv[:1] == ["env"] and len(argv) >= 2:
        problems = env_problems([Path(a) for a in argv[1:]])
        fix = f"the environment is not {' + '.join(argv[1:])}: run `make` again (or delete .venv)"
    else:
        print("usage: check.py lock | check.py env LOCKFILE...", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(fix, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
