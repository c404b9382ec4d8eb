"""The project installs from its own files.

- `requirements.txt` is the lock: every line `name==version`; `environment.yml` mirrors it.
- `pyproject.toml` states lower bounds only (core + extras), each satisfied by the lock.
- `make setup` gives each clone its own small `.venv` over one shared environment per lock, so
  two clones on a machine each import their own `worldmodel`.
- LICENSE (MIT) and CITATION.cff (CFF 1.2 with the papers the models come from).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("atari", "video", "text", "web", "data", "search", "notebook", "dev")


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.strip().lstrip("- ").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        if m:
            out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def lock() -> dict[str, str]:
    return pins((ROOT / "requirements.txt").read_text().splitlines())


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_every_requirement_is_pinned():
    lines = [
        l
        for l in (ROOT / "requirements.txt").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    ]
    assert len(pins(lines)) == len(lines), "every line of requirements.txt must be name==version"
    for name in (
        "torch",
        "torchvision",
        "hydra-core",
        "omegaconf",
        "wandb",
        "einops",
        "timm",
        "av",
        "lpips",
        "submitit",
        "pytest",
        "vector-quantize-pytorch",
        "torchmetrics",
        "procgen-mirror",
        "ale-py",
        "numpy",
        "h5py",
        "hydra-optuna-sweeper",
        "optuna",
        "jupyterlab",
    ):
        assert name in pins(lines), f"{name} is not pinned"
    assert pins(lines)["torch"] == "2.14.1" and pins(lines)["torchvision"] == "0.29.1"


def test_conda_environment_mirrors_requirements():
    env = pins((ROOT / "environment.yml").read_text().splitlines())
    assert env == lock()


def test_package_metadata_has_lower_bounds_and_the_lock_satisfies_them():
    meta = project()
    assert "dynamic" not in meta, (
        "dependencies are written in pyproject.toml, not read from the lock"
    )
    assert set(EXTRAS) <= set(meta["optional-dependencies"])
    pinned = lock()
    reqs = [Requirement(r) for r in meta["dependencies"]]
    for extra, listed in meta["optional-dependencies"].items():
        reqs += [Requirement(r) for r in listed if not r.startswith("worldmodel[")]
        for r in listed:  # the dev extra pulls in the others by name
            if r.startswith("worldmodel["):
                named = set(Requirement(r).extras)
                assert named <= set(meta["optional-dependencies"]) - {extra}, r
    assert {canonicalize_name(r.name) for r in reqs} >= {"torch", "numpy", "hydra-core"}
    for r in reqs:
        name = canonicalize_name(r.name)
        assert not any(s.operator in ("==", "===") for s in r.specifier), f"{r}: pinned exactly"
        assert any(s.operator == ">=" for s in r.specifier), f"{r}: no lower bound"
        assert name in pinned, f"{r.name} is a dependency but not in the lock (requirements.txt)"
        assert r.specifier.contains(pinned[name], prereleases=True), f"lock {pinned[name]} vs {r}"


def test_the_environment_is_the_lock():
    """What `make setup` installed is what requirements.txt says (a stale .venv shows up here)."""
    wrong = {}
    for name, version in lock().items():
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have != version:
            wrong[name] = (version, have)
    assert not wrong, f"lock vs installed (run `make setup`): {wrong}"


def test_jupyter_lab_runs_in_the_environment():
    """jupyterlab comes with the lock; `make notebook` runs it with this clone's interpreter."""
    jupyter = Path(sys.executable).parent / "jupyter"
    assert jupyter.exists(), f"no {jupyter}: jupyterlab comes with the lock (run `make setup`)"
    done = subprocess.run(
        [jupyter, "lab", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == lock()["jupyterlab"]
    assert "$(PY) -m jupyterlab" in (ROOT / "Makefile").read_text()


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "The worldmodel authors" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text
    assert project()["license"] == "MIT" and project()["license-files"] == ["LICENSE"]


def test_citation_file_cites_the_project_and_the_papers():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["message"] and cff["title"].startswith("worldmodel")
    assert cff["authors"] == [{"name": "The worldmodel authors"}]
    assert cff["license"] == project()["license"] and cff["version"] == project()["version"]
    refs = {r["title"]: r for r in cff["references"]}
    expected = {  # title prefix: (first author's family name, year)
        "Genie: Generative Interactive Environments": ("Bruce", 2024),
        "Phenaki:": ("Villegas", 2023),
        "VideoGPT:": ("Yan", 2021),
        "Language Model Beats Diffusion": ("Yu", 2024),
        "Finite Scalar Quantization": ("Mentzer", 2024),
        "Genie 2:": ("Parker-Holder", 2024),
    }
    for prefix, (author, year) in expected.items():
        found = [r for t, r in refs.items() if t.startswith(prefix)]
        assert len(found) == 1, f"no reference titled {prefix!r}"
        ref = found[0]
        assert ref["authors"][0]["family-names"] == author and ref["year"] == year, ref["title"]
        assert ref["type"] in {"article", "conference-paper", "blog"} and ref["url"].startswith(
            "https://"
        )
    assert refs["Genie 2: A large-scale foundation world model"]["type"] == "blog"


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("make demo") < text.index("make test") < 2000
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def shared_env() -> Path:
    """The environment `make setup` installs this lock into (the Makefile's VENV_DIR)."""
    cache = os.environ.get("VENV_CACHE") or Path.home() / ".cache" / "worldmodel" / "venvs"
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()[:16]
    return Path(cache) / f"py311-{digest}"


def which_worldmodel(python: Path) -> str:
    code = "import worldmodel; print(worldmodel.__file__)"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_two_clones_each_run_their_own_code(tmp_path):
    """`make setup` in a second clone: its own .venv, its own editable install, shared packages.

    Reuses the shared environment of this lock (the one this suite runs in), so it takes seconds.
    """
    shared = shared_env()
    if not (shared / ".complete").exists():
        pytest.skip(f"{shared} (this lock's environment) is not built here; `make setup` builds it")
    if shutil.which("make") is None or shutil.which("flock") is None:
        pytest.skip("make and flock are needed for `make setup`")
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in (
        "Makefile",
        "pyproject.toml",
        "requirements.txt",
        "README.md",
        "LICENSE",
        "run.py",
    ):
        shutil.copy2(ROOT / name, clone / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("src", "conf"):
        shutil.copytree(ROOT / name, clone / name, ignore=ignore)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS", "VIRTUAL"))}
    done = subprocess.run(
        ["make", "setup"], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    venv = clone / ".venv"
    assert venv.is_dir() and not venv.is_symlink()
    assert (venv / "worldmodel-env").read_text().split() == [str(shared), str(clone)]
    size = sum(p.lstat().st_size for p in venv.rglob("*"))
    assert size < 5_000_000, (
        f"the clone's .venv holds {size} bytes; the packages belong in {shared}"
    )

    # Each clone imports its own code; the shared environment has none.
    python = venv / "bin" / "python"
    assert which_worldmodel(python) == str(clone / "src" / "worldmodel" / "__init__.py")
    assert which_worldmodel(ROOT / ".venv" / "bin" / "python").startswith(str(ROOT / "src") + "/")
    bare = subprocess.run([shared / "bin" / "python", "-c", "import worldmodel"], timeout=60)
    assert bare.returncode != 0, f"{shared} must not contain worldmodel"

    # Entry points run with the clone's interpreter and packages from the shared environment.
    for cmd in (
        [python, "-m", "pytest", "--version"],
        [python, "-m", "ruff", "--version"],
        [venv / "bin" / "pytest", "--version"],
        [python, "run.py", "--help"],
    ):
        done = subprocess.run(cmd, cwd=clone, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-1000:]}{done.stderr[-2000:]}"
    head = (venv / "bin" / "pytest").read_text().splitlines()[0]
    assert head == f"#!{python}", head

    # A second `make setup` changes nothing.
    again = subprocess.run(["make", "setup"], cwd=clone, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "making .venv" not in again.stdout, again.stdout
