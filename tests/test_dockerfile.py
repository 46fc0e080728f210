"""docker/Dockerfile, read with dockerfile-parse (tests/deployment_files.py): CPU and GPU
targets on pinned bases, a non-root user, a default command and health check that parse with
their real entry points, the right torch build in each image, the plugin commands installed,
no credentials built in; and .dockerignore keeping secrets and bulk out of the context.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import pytest
from deployment_commands import PLUGIN_COMMANDS, check_command, node_option
from deployment_files import (
    DOCKERIGNORE,
    ROOT,
    Instruction,
    argv,
    dockerfile,
    is_pinned,
    our_services,
    services,
    stage_chain,
    stage_dependencies,
    stages,
    words,
)


def test_dockerfile_is_multi_stage_with_cpu_and_gpu_targets() -> None:
    froms = [step.value for step in dockerfile() if step.keyword == "FROM"]
    assert len(froms) >= 2
    assert {"cpu", "gpu"} <= set(stages())


def test_dockerfile_base_images_are_pinned() -> None:
    for name, stage in stages().items():
        base = stage["base"]
        if base in stages() or base == "scratch":
            continue
        assert is_pinned(base), f"stage {name}: FROM {base} is not pinned to a release"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_runs_as_a_non_root_user(target: str) -> None:
    user = None
    for stage in reversed(stage_chain(target)):  # base first: the last USER wins
        for step in stages()[stage]["instructions"]:
            if step.keyword == "USER":
                user = step.value.split(":")[0]
    assert user is not None, f"{target}: no USER, the image runs as root"
    assert user not in ("root", "0"), f"{target}: USER {user}"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_default_command_and_health_check_agree(target: str) -> None:
    instructions = {step.keyword: step.value for step in stages()[target]["instructions"]}
    command = json.loads(instructions["CMD"])
    check_command(command, f"{target} CMD")
    check = instructions["HEALTHCHECK"]
    words = shlex.split(check.split(" CMD ", 1)[1])
    words = words[: words.index(">")] if ">" in words else words
    check_command(words, f"{target} HEALTHCHECK")
    node = node_option(command)
    assert node and words[words.index("-d") + 1] == node.replace("%h", "$HOSTNAME")


def shell_commands(step: Instruction) -> list[list[str]]:
    """A RUN step's commands (its words split at `&&`), build args substituted."""
    commands: list[list[str]] = [[]]
    for word in words(step):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


def torch_indexes(target: str) -> set[str]:
    """The index URLs that the `pip install … torch==…` steps of `target` use, ARGs resolved."""
    urls = set()
    for stage in stage_dependencies(target):
        for step in stages()[stage]["instructions"]:
            for command in shell_commands(step) if step.keyword == "RUN" else []:
                if command[:2] != ["pip", "install"]:
                    continue
                if not any(word.startswith("torch==") for word in command):
                    continue
                match = re.search(r"--index-url[ =](\S+)", " ".join(command))
                assert match, f"stage {stage}: torch installed without --index-url"
                urls.add(match.group(1))
    return urls


def test_images_install_the_project_with_the_right_torch() -> None:
    cpu, gpu = stage_dependencies("cpu"), stage_dependencies("gpu")

    def text(names: set[str]) -> str:
        return "\n".join(
            f"{step.keyword} {step.value}"
            for name in sorted(names)
            for step in stages()[name]["instructions"]
        )

    assert torch_indexes("cpu") == {"https://download.pytorch.org/whl/cpu"}, "CPU build"
    assert torch_indexes("gpu"), "GPU image: no torch install found"
    assert not any("/whl/cpu" in url for url in torch_indexes("gpu")), "GPU image: CUDA build"
    assert "torch.version.cuda is None" in text(cpu), "the CPU build checks it has no CUDA"
    assert "assert torch.version.cuda" in text(gpu), "the GPU build checks it has CUDA"
    for step in [step for name in cpu | gpu for step in stages()[name]["instructions"]]:
        if step.keyword == "RUN" and "pip install" in step.value:
            assert not re.search(r"\s(-e|--editable)\s", step.value), "install the project, not -e"


def test_images_install_the_plugin_commands() -> None:
    """`celery flower` exists in the images: an extra they install carries the package."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get(
        "optional-dependencies", {}
    )
    runs = "\n".join(step.value for step in dockerfile() if step.keyword == "RUN")
    installed = set(re.findall(r"/src\[([\w,-]+)\]", runs))
    names = {
        re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
        for group in installed
        for extra in group.split(",")
        for requirement in extras.get(extra, [])
    }
    for command, package in PLUGIN_COMMANDS.items():
        if any(command in argv(services()[n]["command"]) for n in our_services()):
            assert package in names, (
                f"`celery {command}` needs {package} in the images: add it to an optional "
                f"dependency group of pyproject.toml that docker/Dockerfile installs "
                f"(it installs {sorted(installed)})"
            )


def test_dockerfile_builds_in_no_credentials() -> None:
    for step in dockerfile():
        if step.keyword in ("ENV", "ARG"):
            for variable in step.envs if step.keyword == "ENV" else step.args:
                assert not re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", variable.upper()), (
                    f"{step.keyword} {variable}: credentials come from the environment at run time"
                )


def test_dockerignore_keeps_secrets_and_bulk_out_of_the_context() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".env", ".venv", ".git", "runs", "data"):
        assert required in patterns, f".dockerignore: add {required}"
    assert patterns & {"*.pt", "**/*.pt"}, ".dockerignore: add **/*.pt"
    assert patterns & {"__pycache__", "**/__pycache__"}, ".dockerignore: add **/__pycache__"
