"""The Dockerfile without docker: its base image's torch meets every declared torch floor
(pyproject.toml, and what the installed accelerate / transformers / diffusers / peft /
bitsandbytes require), the install pins that torch, and .dockerignore keeps the build
context to what the image copies."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_args(text: str) -> dict[str, str]:
    """``ARG NAME=VALUE`` defaults of a Dockerfile, ``${NAME}`` expanded from earlier ones."""
    args: dict[str, str] = {}
    for name, value in re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", text, flags=re.M):
        args[name] = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value)
    return args


def image_torch(text: str) -> Version:
    """The torch of the base image: ``pytorch/pytorch:<torch>-cuda…`` tags name it."""
    args = dockerfile_args(text)
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", base)
    assert m, f"base image {base!r} is not an official pytorch/pytorch tag naming its torch"
    assert Version(args["TORCH_VERSION"]) == Version(m.group(1)), "TORCH_VERSION differs from the image's"
    return Version(m.group(1))


def torch_floors() -> dict[str, Version]:
    """Every torch floor in force: pyproject's and each installed dependency's."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors: dict[str, Version] = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        if req.name == "torch":
            floors["pyproject.toml"] = max(Version(s.version) for s in req.specifier if s.operator == ">=")
    for package in ("accelerate", "diffusers", "transformers", "peft", "bitsandbytes"):
        try:
            reqs = requires(package) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            extra_ok = req.marker is None or req.marker.evaluate({"extra": "torch"})
            if req.name == "torch" and extra_ok:
                lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=", ">")]
                if lows:
                    floors[package] = max(lows)
    return floors


def test_dockerfile_base_torch_meets_every_floor():
    text = (ROOT / "Dockerfile").read_text()
    torch = image_torch(text)
    floors = torch_floors()
    assert "pyproject.toml" in floors and "accelerate" in floors, floors
    low = {k: str(v) for k, v in floors.items() if torch < v}
    assert not low, f"the image's torch {torch} is below the floor of {low}: pick a newer pytorch/pytorch tag"
    # the install pins the image's torch, so pip cannot swap it for another build
    assert re.search(r'pip install [^\n]*"torch==\$\{TORCH_VERSION\}"', text)


def test_the_checks_see_an_old_image():
    old = "ARG TORCH_VERSION=2.5.1\nARG BASE_IMAGE=pytorch/pytorch:${TORCH_VERSION}-cuda12.4-cudnn9-runtime\n"
    torch = image_torch(old + "FROM ${BASE_IMAGE}\n")
    assert torch == Version("2.5.1") and torch < torch_floors()["accelerate"]  # today's accelerate: >= 2.6


def test_dockerignore_keeps_runs_demos_venvs_and_git_out():
    lines = [x.strip() for x in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [x for x in lines if x and not x.startswith("#")]
    assert rules[0] == "*"  # everything out, then only what the Dockerfile copies back in
    copied = set(re.findall(r"^COPY\s+(.+?)\s+\S+$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    wanted = {p.rstrip("/") for c in copied for p in c.split()}
    assert {r.removeprefix("!").rstrip("/") for r in rules if r.startswith("!")} == wanted
