"""The project installs from its own files: every direct dependency pinned, conda mirrors pip."""

from __future__ import annotations

import re

from conftest import ROOT


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.strip().lstrip("- ").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


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
        "decord",
        "lpips",
        "submitit",
        "pytest",
        "vector-quantize-pytorch",
        "torchmetrics",
        "procgen-mirror",
        "ale-py",
        "numpy",
    ):
        assert name in pins(lines), f"{name} is not pinned"
    assert pins(lines)["torch"] == "2.14.1" and pins(lines)["torchvision"] == "0.29.1"


def test_conda_environment_mirrors_requirements():
    req = pins((ROOT / "requirements.txt").read_text().splitlines())
    env = pins((ROOT / "environment.yml").read_text().splitlines())
    assert env == req


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.index("make demo") < text.index("make test") < 2000
    assert "make test" in (ROOT / ".ci" / "run").read_text()
