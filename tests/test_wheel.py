"""Raspberry Pi readiness: the runtime wheel installs on 64-bit ARM Linux, without TensorFlow.

The wheel is built here offline (``pip wheel --no-deps --no-build-isolation --no-index``) from a
copy of the checkout, tests/, benchmarks/ and examples/ included, so that what leaks into it is
what would leak from a user's tree (the work tree gets no build/ or egg-info). Its unconditional
requirements must not pull in a training framework, and every package they resolve to
(transitively) must publish a wheel a Pi can install: manylinux aarch64 or pure Python, for
CPython 3.10 to 3.13. That part asks the package index (``pip install --dry-run
--report``, which reads only metadata, not the tens of MB of native wheels) and is skipped
when the index cannot be reached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"tensorflow", "tensorflow-cpu", "tf-nightly", "tf-keras", "keras", "torch", "transformers", "jax",
         "jaxlib", "flax"}
PYTHONS = ("3.10", "3.11", "3.12", "3.13")  # 3.11: Raspberry Pi OS Bookworm; 3.13: Trixie
# Raspberry Pi OS Bookworm (Debian 12) has glibc 2.36 (Trixie more). A manylinux_2_X wheel installs
# on any glibc >= X; recent pip takes --platform literally, so every tag up to 2.36 is listed.
PI_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)]


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


NOT_SHIPPED = ("tests", "benchmarks", "examples")


def copy_checkout(dest: Path) -> None:
    """The files of the checkout: tracked by git, or new and not ignored (work not yet committed
    is built too); outside a git checkout, the tree without VCS, virtualenv and build artifacts."""
    git = shutil.which("git")
    ls = git and subprocess.run([git, "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, timeout=60)
    if not ls or ls.returncode != 0:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
            "*.tflite", "*.litertlm"))
        return
    for name in filter(None, ls.stdout.decode().split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not there
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    copy_checkout(src)
    # the leak check below means something only if the source had these folders to leak
    assert all((src / d).is_dir() for d in NOT_SHIPPED), sorted(p.name for p in src.iterdir())
    run = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(tmp / "dist"), str(src))
    assert run.returncode == 0, run.stdout + run.stderr
    (built,) = (tmp / "dist").glob("gemma_edge-*.whl")
    return built


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(z.read(name).decode("utf-8"))


def _unconditional(wheel: Path) -> list[Requirement]:
    reqs = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist") or []]
    return [r for r in reqs if r.marker is None or "extra" not in str(r.marker)]


def test_wheel_is_pure_python_with_the_runtime(wheel):
    _, _, _, tags = parse_wheel_filename(wheel.name)
    assert {str(t) for t in tags} == {"py3-none-any"}
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for module in ("gemma_edge/__init__.py", "gemma_edge/runtime/engine.py", "gemma_edge/runtime/backend.py",
                   "gemma_edge/runtime/cli.py"):
        assert module in names, module
    leaked = sorted(n for n in names if set(n.split("/")[:-1]) & set(NOT_SHIPPED))
    assert not leaked, f"the wheel ships {leaked[:10]}"


def test_runtime_requirements_have_no_training_framework(wheel):
    runtime = {canonicalize_name(r.name) for r in _unconditional(wheel)}
    assert runtime, "the wheel declares no runtime requirements"
    assert not runtime & HEAVY, f"the runtime would install {sorted(runtime & HEAVY)}"
    # the converter's TensorFlow is there, but only behind an extra
    extras = [Requirement(r) for r in _metadata(wheel).get_all("Requires-Dist") if "extra" in r]
    assert any(canonicalize_name(r.name).startswith("tensorflow") for r in extras)


def _index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        for line in _pip("config", "list", timeout=30).stdout.splitlines():
            key, _, value = line.partition("=")
            if key.strip() in ("global.index-url", "install.index-url", ":env:.index-url"):
                url = value.strip().strip("'\"")
    return (url or "https://pypi.org/simple").rstrip("/")


@pytest.fixture(scope="module")
def index_url() -> str:
    url = _index_url()
    try:
        with urllib.request.urlopen(f"{url}/click/", timeout=10) as response:
            response.read(1)
    except (urllib.error.URLError, OSError) as e:
        pytest.skip(f"the package index {url} is unreachable ({e}); the aarch64 wheel check needs it")
    return url


@pytest.mark.parametrize("python", PYTHONS)
def test_runtime_installs_from_aarch64_wheels(wheel, index_url, python, tmp_path):
    """Resolve the wheel and everything it needs as pip on a 64-bit Pi would, wheels only."""
    report = tmp_path / "report.json"
    platforms = [arg for p in PI_PLATFORMS for arg in ("--platform", p)]
    run = _pip("install", "--dry-run", "--ignore-installed", "--only-binary=:all:", *platforms,
               "--python-version", python, "--implementation", "cp", "--target", str(tmp_path / "target"),
               "--retries", "1", "--timeout", "30", "--report", str(report), str(wheel), timeout=300)
    assert run.returncode == 0, (f"no installable set of aarch64 wheels for CPython {python}:\n"
                                 f"{run.stderr[-3000:]}")
    resolved = {}
    for item in json.loads(report.read_text())["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        filename = item["download_info"]["url"].rsplit("/", 1)[-1]
        resolved[name] = filename
        assert filename.endswith(".whl"), filename
        _, _, _, tags = parse_wheel_filename(filename)
        platforms_of_file = {t.platform for t in tags}
        assert platforms_of_file & ({"any"} | set(PI_PLATFORMS)), f"{filename} has no aarch64 Linux build"
    assert not set(resolved) & HEAVY, f"installing the runtime pulls in {sorted(set(resolved) & HEAVY)}"
    missing = {canonicalize_name(r.name) for r in _unconditional(wheel)} - set(resolved)
    assert not missing, f"{sorted(missing)} did not resolve"
    print(f"\nCPython {python} on aarch64:", *sorted(resolved.values()), sep="\n  ")
