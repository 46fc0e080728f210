"""The versions a site installs are the ones CI tested: pyproject.toml bounds what needs it,
constraints.txt pins every dependency, and `make install` and the images both use it.
"""

from __future__ import annotations

import tomllib

from deployment_commands import PLUGIN_COMMANDS
from deployment_files import ROOT
from dockerfile_files import image_commands


def test_dependencies_are_bounded_and_installed_at_the_versions_ci_tested() -> None:
    """A site installs what CI tested: `make install` and the images use constraints.txt,
    which pins every dependency (torch aside: the Makefile and the Dockerfile pin it); and a
    dependency is bounded above in pyproject.toml (its next major, 0.x: minor, release)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"]]
    for extra in ("dev", "deploy", "int8"):
        requirements += [Requirement(r) for r in project["optional-dependencies"][extra]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        upper = [s for s in requirement.specifier if s.operator in ("<", "<=", "==")]
        # every one: the next major (0.x: minor; calendar versions: a year ahead) may break
        assert upper, f"pyproject.toml: bound {requirement} above its next major release"
        if name in ("torch", "torchvision") or name in PLUGIN_COMMANDS.values():
            continue  # installed by their own pinned step; Flower only in the images
        assert name in pins, f"constraints.txt has no pin for {name}: run `make constraints`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside {requirement}"
        )
    makefile = (ROOT / "Makefile").read_text()
    assert "-c constraints.txt -e '.[dev,int8]'" in makefile
    for target in ("cpu", "gpu"):  # each image's build, docker/build_env.sh's commands included
        installs = [" ".join(c) for c in image_commands(target) if c[:2] == ["pip", "install"]]
        constrained = [c for c in installs if "-c /src/constraints.txt" in c]
        assert len(constrained) == 1, f"{target}: installs with constraints.txt: {constrained}"
        assert "-r /src/requirements.txt" in constrained[0], f"{target}: {constrained[0]}"
