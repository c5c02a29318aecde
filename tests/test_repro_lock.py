"""constraints.txt pins every dependency that pyproject.toml and the Makefile declare, at versions they allow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def locked(text: str) -> dict[str, Version]:
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert match, f"constraints.txt:{number}: {line!r} is not a pinned name==version"
        pins[canonicalize_name(match[1])] = Version(match[2])
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [spec for group in project.get("optional-dependencies", {}).values() for spec in group]
    return [Requirement(spec) for spec in [*project["dependencies"], *extras]]


def makefile_pins() -> list[Requirement]:
    """The packages the Makefile names with a version (torch first, the --no-deps data packages)."""
    text = (ROOT / "Makefile").read_text()
    setup = text[text.index("$(STAMP):"):text.index("setup: $(STAMP)")]
    setup = setup[:setup.index("lock:")]
    no_deps = re.search(r"^NO_DEPS := (.+)$", text, re.MULTILINE)[1].split()
    return [Requirement(spec) for spec in [*re.findall(r"\b[\w.-]+==[\w.+]+", setup), *no_deps]]


def unlocked(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    problems = []
    for requirement in requirements:
        pin = pins.get(canonicalize_name(requirement.name))
        if pin is None:
            problems.append(f"{requirement.name}: not in constraints.txt")
        elif not requirement.specifier.contains(pin, prereleases=True):
            problems.append(f"{requirement.name}: locked at {pin}, declared {requirement.specifier}")
    return problems


def test_every_declared_dependency_is_locked_at_an_allowed_version():
    assert unlocked(declared() + makefile_pins(), locked(LOCK.read_text())) == []


def test_a_dependency_missing_from_the_lock_is_named():
    pins = locked(LOCK.read_text())
    del pins["pydantic"]
    pins["numpy"] = Version("1.0")
    assert unlocked(declared(), pins) == ["pydantic: not in constraints.txt", "numpy: locked at 1.0, declared >=1.26"]


def test_torch_is_the_locked_cpu_build_installed_first():
    assert locked(LOCK.read_text())["torch"] == Version("2.13.0+cpu")
    text = (ROOT / "Makefile").read_text()
    setup = text[text.index("$(STAMP):"):text.index("setup: $(STAMP)")]
    setup = setup[:setup.index("lock:")]  # the recipe of the stamp alone
    installs = [line.strip() for line in setup.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert installs[0].endswith("-c $(LOCK) torch==2.13.0"), installs[0]
    assert all("-c $(LOCK)" in line for line in installs), installs


def test_tqdm_is_not_a_dependency_and_not_imported():
    assert "tqdm" not in {canonicalize_name(r.name) for r in declared()}
    for folder in ("src", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            assert not re.search(r"^\s*(import|from)\s+tqdm\b", path.read_text(), re.MULTILINE), path
