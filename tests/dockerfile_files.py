"""The image build as the deployment tests read it: docker/Dockerfile (dockerfile-parse:
instructions with continuation lines joined, the build args in force at each, the stages and
what each builds on), the commands its RUN steps run, the build script they call
(docker/build_env.sh) run with stand-ins for pip, python and rollscan, and .dockerignore's
patterns as Docker matches them.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import subprocess
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from deployment_files import DOCKERFILE, DOCKERIGNORE, ROOT
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from
from dockerfile_parse.util import WordSplitter


class Instruction(NamedTuple):
    keyword: str  # FROM, RUN, … (upper case)
    value: str  # its arguments, continuation lines joined
    args: dict[str, str]  # the build args in force at it, with their values
    envs: dict[str, str]  # the ENV variables set so far in its stage


@cache
def dockerfile_parser() -> DockerfileParser:
    return DockerfileParser(str(DOCKERFILE), cache_content=True)


@cache
def dockerfile() -> list[Instruction]:
    """docker/Dockerfile's instructions in order, comments left out."""
    parser = dockerfile_parser()
    return [
        Instruction(step["instruction"], step["value"], context.args, context.envs)
        for step, context in zip(parser.structure, parser.context_structure, strict=True)
        if step["instruction"] != "COMMENT"
    ]


@cache
def global_args() -> dict[str, str]:
    """The build args declared before the first FROM, with their defaults."""
    args: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            break
        args = instruction.args
    return args


def words(instruction: Instruction) -> list[str]:
    """The instruction's arguments split as the shell would, its build args substituted."""
    return list(WordSplitter(instruction.value, args=instruction.args).split())


@cache
def stages() -> dict[str, dict[str, Any]]:
    """Each stage: its base (an image, global build args substituted, or an earlier stage) and
    its instructions."""
    bases = iter(dockerfile_parser().parent_images)
    result: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for instruction in dockerfile():
        if instruction.keyword == "FROM":
            image, name = image_from(instruction.value)
            for variable in re.findall(r"\$\{?(\w+)", image):
                assert global_args().get(variable), f"FROM {image}: a build arg without a default"
            current = {"base": next(bases), "instructions": []}
            result[name or str(len(result))] = current
        else:
            assert current is not None or instruction.keyword == "ARG", (
                f"{instruction.keyword} before the first FROM"
            )
            if current is not None:
                current["instructions"].append(instruction)
    return result


def stage_chain(name: str) -> list[str]:
    """The stage and the stages it builds on, nearest first."""
    chain = [name]
    while stages()[chain[-1]]["base"] in stages():
        chain.append(stages()[chain[-1]]["base"])
    return chain


def stage_dependencies(name: str) -> set[str]:
    """Every stage whose output ends up in `name`: its bases and what it copies from."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        stage = todo.pop()
        if stage in seen:
            continue
        seen.add(stage)
        if stages()[stage]["base"] in stages():
            todo.append(stages()[stage]["base"])
        for instruction in stages()[stage]["instructions"]:
            if instruction.keyword == "COPY":
                copied = [w.removeprefix("--from=") for w in words(instruction)
                          if w.startswith("--from=")]  # fmt: skip
                todo += [source for source in copied if source in stages()]
    return seen


def shell_commands(step: Instruction) -> list[list[str]]:
    """A RUN step's commands (its words split at `&&`), build args substituted."""
    commands: list[list[str]] = [[]]
    for word in words(step):
        if word == "&&":
            commands.append([])
        else:
            commands[-1].append(word)
    return commands


class ScriptRun(NamedTuple):
    script: Path  # the file in this checkout the stage copied in
    arguments: list[str]
    environment: dict[str, str]  # the build args and ENV in force at the RUN


class BuildStep(NamedTuple):
    stage: str
    instruction: Instruction
    commands: list[list[str]]  # a RUN's commands, a script it runs replaced by what that runs
    scripts: list[ScriptRun]  # the scripts it runs


@cache
def build_steps(target: str) -> list[BuildStep]:
    """The instructions of every stage whose output ends up in `target`, in the Dockerfile's
    order; where a RUN runs a shell script a COPY of the stage's chain took from the build
    context (docker/build_env.sh), the commands the script runs with those arguments and the
    stage's build args in its environment (`script_commands`), in place of the script."""
    wanted = stage_dependencies(target)
    steps: list[BuildStep] = []
    for name, stage in stages().items():
        if name not in wanted:
            continue
        copied = {  # what the stage's chain copied from the context so far: path in image → file
            path: source
            for base in reversed(stage_chain(name)[1:])
            for step in stages()[base]["instructions"]
            for path, source in context_copies(step).items()
        }
        for step in stage["instructions"]:
            copied |= context_copies(step)
            commands, scripts = [], []
            for command in shell_commands(step) if step.keyword == "RUN" else []:
                start = 2 if command[:1] == ["sh"] and len(command) > 1 else 1
                if not command[start - 1].endswith(".sh"):
                    commands.append(command)
                    continue
                script = command[start - 1]
                assert script in copied, f"stage {name}: runs {script}, which no COPY put there"
                run = ScriptRun(copied[script], command[start:], {**step.envs, **step.args})
                scripts.append(run)
                commands += script_commands(run)
            steps.append(BuildStep(name, step, commands, scripts))
    return steps


def image_commands(target: str) -> list[list[str]]:
    """Every command the build of `target` runs, in order (`build_steps`)."""
    return [command for step in build_steps(target) for command in step.commands]


def context_copies(step: Instruction) -> dict[str, Path]:
    """The files a COPY takes from the build context (not --from a stage): path in the image →
    the file in this checkout."""
    if step.keyword != "COPY" or any(w.startswith("--from") for w in words(step)):
        return {}
    *sources, destination = [w for w in words(step) if not w.startswith("--")]
    return {
        destination if len(sources) == 1 and not destination.endswith("/")
        else posixpath.join(destination, posixpath.basename(source)): ROOT / source
        for source in sources
    }  # fmt: skip


# what a build script may run: a stand-in for each records its arguments; so does one for the
# python the script is given (an argument like python3.11)
STAND_INS = ("pip", "python", "rollscan")


def run_script(run: ScriptRun, fail_at: int | None = None) -> tuple[int, str, list[list[str]]]:
    """`sh SCRIPT ARGUMENTS` with its environment and only stand-ins on PATH (a command with no
    stand-in is not found): (exit status, stderr, the commands it ran, each as its words). With
    `fail_at`, the command at that position (from 0) exits 1."""
    with tempfile.TemporaryDirectory() as folder:
        bin_dir, log, count = Path(folder, "bin"), Path(folder, "commands"), Path(folder, "count")
        bin_dir.mkdir()
        count.write_text("0\n")
        names = set(STAND_INS) | {a for a in run.arguments if re.fullmatch(r"python[\d.]*", a)}
        fail = -1 if fail_at is None else fail_at + 1
        for name in names:  # builtins only: PATH holds nothing else
            stand_in = bin_dir / name
            stand_in.write_text(
                "#!/bin/sh\n"
                f'printf \'%s\\037\' "${{0##*/}}" "$@" >> {shlex.quote(str(log))}\n'
                f"printf '\\036' >> {shlex.quote(str(log))}\n"
                f"read -r n < {shlex.quote(str(count))}\n"
                f"echo $((n + 1)) > {shlex.quote(str(count))}\n"
                f'[ "$((n + 1))" -ne {fail} ]\n'
            )
            stand_in.chmod(0o755)
        done = subprocess.run(
            ["/bin/sh", str(run.script), *run.arguments],
            env={**run.environment, "PATH": str(bin_dir)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        records = log.read_text().split("\036")[:-1] if log.exists() else []
        return done.returncode, done.stderr, [record.split("\037")[:-1] for record in records]


def script_commands(run: ScriptRun) -> list[list[str]]:
    """The commands the script runs (`run_script`); it must exit 0."""
    status, stderr, commands = run_script(run)
    assert status == 0, (
        f"sh {run.script.relative_to(ROOT)} {shlex.join(run.arguments)}: exit {status}, "
        f"{stderr.strip()}"
    )
    return commands


# --------------------------------------------------------------------------- .dockerignore


@cache
def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker matches it (Go's filepath.Match, plus `**` for any
    number of folders), against a path relative to the context."""
    pattern = posixpath.normpath(pattern.lstrip("/"))
    regex = ""
    for part in re.split(r"(\*\*/?|\*|\?|\[[^]]*\])", pattern):
        if part.startswith("**"):
            regex += "(.*/)?" if part.endswith("/") else ".*"
        elif part == "*":
            regex += "[^/]*"
        elif part == "?":
            regex += "[^/]"
        elif part.startswith("[") and part.endswith("]"):
            regex += part  # a class: Go's [^…] is the regex's
        else:
            regex += re.escape(part)
    return re.compile(regex)


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative to the context) out of the build context:
    the last pattern that matches it or a folder above it decides (`!` lets it back in)."""
    parts = posixpath.normpath(path).split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in dockerignore_patterns():
        if any(dockerignore_regex(pattern.removeprefix("!")).fullmatch(c) for c in candidates):
            excluded = not pattern.startswith("!")
    return excluded
