"""docker/Dockerfile, read with dockerfile-parse (tests/deployment_files.py), and
docker/build_env.sh, the recipe both build stages run (its commands recorded by stand-ins):
CPU and GPU targets on pinned bases, a non-root user, a default command and health check that
parse with their real entry points, the right torch build in each image, the plugin commands
installed, the layers in the order the cache needs, no credentials built in; and .dockerignore
keeping secrets and bulk out of the context and what the Dockerfile copies in.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import tomllib
from collections.abc import Callable

import pytest
from deployment_commands import PLUGIN_COMMANDS, check_command, node_option
from deployment_files import BUILD_SCRIPT, ROOT, argv, is_pinned, our_services, services
from dockerfile_files import (
    BuildStep,
    build_steps,
    context_copies,
    dockerfile,
    dockerignore_excludes,
    dockerignore_patterns,
    image_commands,
    run_script,
    stage_chain,
    stages,
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


def is_pip_install(command: list[str]) -> bool:
    return command[:2] == ["pip", "install"]


def torch_indexes(target: str) -> set[str]:
    """The index URLs that the `pip install … torch==…` commands of `target`'s build use."""
    urls = set()
    for command in filter(is_pip_install, image_commands(target)):
        if not any(word.startswith("torch==") for word in command):
            continue
        match = re.search(r"--index-url[ =](\S+)", " ".join(command))
        assert match, f"{target}: torch installed without --index-url ({shlex.join(command)})"
        urls.add(match.group(1))
    return urls


def torch_checks(target: str) -> list[tuple[int, str]]:
    """(position among the build's commands, code) of each `python -c` that checks torch's build."""
    return [
        (i, command[-1])
        for i, command in enumerate(image_commands(target))
        if command[:1] == ["python"] and "-c" in command and "torch.version.cuda" in command[-1]
    ]


def test_images_install_the_project_with_the_right_torch() -> None:
    assert torch_indexes("cpu") == {"https://download.pytorch.org/whl/cpu"}, "CPU build"
    assert torch_indexes("gpu"), "GPU image: no torch install found"
    assert not any("/whl/cpu" in url for url in torch_indexes("gpu")), "GPU image: CUDA build"
    cpu, gpu = torch_checks("cpu"), torch_checks("gpu")
    assert cpu, "the CPU build checks it has no CUDA"
    assert all("assert torch.version.cuda is None" in code for _, code in cpu), cpu
    assert gpu, "the GPU build checks it has CUDA"
    assert all(re.search(r"assert torch\.version\.cuda(?! is None)", code) for _, code in gpu), gpu
    for target, checks in (("cpu", cpu), ("gpu", gpu)):
        commands = image_commands(target)
        last_install = max(i for i, c in enumerate(commands) if is_pip_install(c))
        assert checks[-1][0] > last_install, (
            f"{target}: torch's build not checked after the last install"
        )
        for command in filter(is_pip_install, commands):
            assert not {"-e", "--editable"} & set(command), "install the project, not -e"


def test_images_install_the_plugin_commands() -> None:
    """`celery flower` exists in the images: an extra they install carries the package."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get(
        "optional-dependencies", {}
    )
    for name in our_services():
        target = services()[name]["build"]["target"]
        runs = "\n".join(shlex.join(command) for command in image_commands(target))
        installed = set(re.findall(r"/src\[([\w,-]+)\]", runs))
        names = {
            re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()
            for group in installed
            for extra in group.split(",")
            for requirement in extras.get(extra, [])
        }
        for command, package in PLUGIN_COMMANDS.items():
            if command in argv(services()[name]["command"]):
                assert package in names, (
                    f"{name}: `celery {command}` needs {package} in the {target} image: add it "
                    f"to an optional dependency group of pyproject.toml that docker/build_env.sh "
                    f"installs (it installs {sorted(installed)})"
                )


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_build_copies_what_changes_often_after_installing_what_is_slow(target: str) -> None:
    """The layer cache the Dockerfile's comments promise, in the stage that builds the
    environment: torch is installed before the requirements are copied in, and they are
    installed before the sources are, each in a RUN of its own, so that a change in the sources
    reinstalls only the project, and one in the requirements does not fetch torch again."""
    built_in = {step.stage for step in build_steps(target)
                if any(is_pip_install(c) and "/src[" in " ".join(c) for c in step.commands)}  # fmt: skip
    assert len(built_in) == 1, f"{target}: the project is installed in stages {built_in}"
    chain = stage_chain(built_in.pop())
    steps = [step for step in build_steps(target) if step.stage in chain]  # bases first

    def first(what: str, found: Callable[[BuildStep], bool]) -> int:
        at = [i for i, step in enumerate(steps) if found(step)]
        assert at, f"{target}: no step {what} in stages {chain}"
        return at[0]

    def installs(word: str) -> Callable[[BuildStep], bool]:
        return lambda step: any(
            is_pip_install(c) and any(w.startswith(word) for w in c) for c in step.commands
        )

    def copies(path: str) -> Callable[[BuildStep], bool]:
        pattern = re.compile(rf"\s{re.escape(path)}(\s|$)")
        return lambda step: (
            step.instruction.keyword == "COPY" and bool(pattern.search(step.instruction.value))
        )

    order = [
        first("installing torch", installs("torch==")),
        first("copying the requirements", copies("/src/requirements.txt")),
        first("installing the requirements", installs("/src/requirements.txt")),
        first("copying the sources", copies("/src")),
        first("installing the project", installs("/src[")),
    ]
    assert all(a < b for a, b in itertools.pairwise(order)), (
        f"{target}: torch, COPY requirements, requirements, COPY sources, project are steps "
        f"{order} of stages {chain}"
    )


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_build_stops_at_the_first_command_that_fails(target: str) -> None:
    """A failed command of docker/build_env.sh (pip check, an import, the torch build check)
    fails its RUN, and so the build, as it did in a RUN's `&&` chain: the script stops there
    and exits non-zero."""
    runs = [run for step in build_steps(target) for run in step.scripts]
    assert runs, f"{target}: docker/build_env.sh is not run"
    for run in runs:
        _, _, commands = run_script(run)
        for failing in range(len(commands)):
            status, _, ran = run_script(run, fail_at=failing)
            assert status != 0 and len(ran) == failing + 1, (
                f"{target}: build_env.sh {' '.join(run.arguments)} went on after "
                f"`{' '.join(commands[failing])}` failed (exit {status}, ran {len(ran)} commands)"
            )


def test_dockerfile_builds_in_no_credentials() -> None:
    secret = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")
    for step in dockerfile():
        if step.keyword in ("ENV", "ARG"):
            for variable in step.envs if step.keyword == "ENV" else step.args:
                assert not secret.search(variable.upper()), (
                    f"{step.keyword} {variable}: credentials come from the environment at run time"
                )
    # the build script's variables, exported ones included (its ENV)
    for variable in re.findall(r"\b([A-Za-z_]\w*)=", BUILD_SCRIPT.read_text()):
        assert not secret.search(variable.upper()), (
            f"docker/build_env.sh sets {variable}: credentials come from the environment at run time"
        )


def test_dockerignore_keeps_secrets_and_bulk_out_of_the_context() -> None:
    patterns = set(dockerignore_patterns())
    for required in (".env", ".venv", ".git", "runs", "data"):
        assert required in patterns, f".dockerignore: add {required}"
    assert patterns & {"*.pt", "**/*.pt"}, ".dockerignore: add **/*.pt"
    assert patterns & {"__pycache__", "**/__pycache__"}, ".dockerignore: add **/__pycache__"


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    """Every file or folder a COPY takes from the context (the sources, docker/build_env.sh)
    exists and is not left out of the context by .dockerignore."""
    copied = [source for step in dockerfile() for source in context_copies(step).values()]
    assert BUILD_SCRIPT in copied, "docker/Dockerfile does not copy docker/build_env.sh"
    for source in copied:
        path = source.relative_to(ROOT).as_posix()
        assert source.exists(), f"docker/Dockerfile copies {path}, which does not exist"
        assert not dockerignore_excludes(path), f".dockerignore leaves {path} out of the context"
