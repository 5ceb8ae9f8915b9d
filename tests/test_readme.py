"""The README's commands run as written: every `centermask` command parses with the CLI's own
parser and names files that exist; the short ones (all but the demo's 40-epoch training and
the TF Serving commands, which need Docker and a server) run in a fresh folder laid out as a
clone after `make demo` (through the CLI's entry point in this process), and so does the Python
example."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from centermask_tf.cli import build_parser, main

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Long or needing what a test machine lacks (Docker, a running TF Serving).
NOT_RUN = ("centermask train --config configs/shapes_tiny.yaml --workdir work/demo", "docker ", "curl ",
           "serve_client.py")


def blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def commands():
    """The README's shell commands, continuation lines joined."""
    found = []
    for block in blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                found.append(line)
    return found


def centermask_commands():
    return [c for c in commands() if c.startswith(".venv/bin/centermask ")]


def test_the_readme_has_commands_of_every_kind():
    names = {shlex.split(c)[1] for c in centermask_commands()}
    assert {"train", "evaluate", "predict", "export", "make-shapes", "ablate", "info"} <= names
    assert len(README.splitlines()) <= 300


@pytest.mark.parametrize("command", centermask_commands())
def test_every_centermask_command_parses_and_names_existing_configs(command):
    args = build_parser().parse_args(shlex.split(command)[1:])
    configs = args.config if isinstance(getattr(args, "config", None), list) else [getattr(args, "config", None)]
    for config in filter(None, configs):
        assert (ROOT / config).is_file(), config


def test_every_make_target_and_script_the_readme_names_exists():
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"make ([a-z-]+)", README):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
    for script in re.findall(r"scripts/\w+\.py", README):
        assert (ROOT / script).is_file(), script


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """A folder laid out as a clone after `make demo`: configs, `.venv/bin/centermask`, a small
    shapes set in work/shapes and a briefly trained work/demo."""
    folder = tmp_path_factory.mktemp("clone")
    (folder / "configs").symlink_to(ROOT / "configs")
    (folder / "scripts").symlink_to(ROOT / "scripts")
    bin_dir = folder / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "centermask").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m centermask_tf.cli "$@"\n')
    (bin_dir / "centermask").chmod(0o755)
    shapes = ["--set", "data.train.annotations=work/shapes/annotations/instances_train.json",
              "--set", "data.train.images=work/shapes/train",
              "--set", "data.val.annotations=work/shapes/annotations/instances_val.json",
              "--set", "data.val.images=work/shapes/val"]
    run = subprocess.run([str(bin_dir / "centermask"), "make-shapes", "--output", "work/shapes", "--train", "16",
                          "--val", "8"], cwd=folder, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]  # the launcher works as a shell command
    in_folder(folder, ["train", "--config", "configs/shapes_tiny.yaml", "--workdir", "work/demo", *shapes,
                       "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "eval.every_epochs=0"])
    return folder


def in_folder(folder, argv):
    """`centermask ARGV` run in `folder` in this process: the CLI's own entry point, as the
    launcher calls it, without a TensorFlow start-up per command (most of each one's time)."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        assert main(argv) == 0, " ".join(argv)
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_the_short_commands_run_as_written(clone):
    ran = 0
    for command in commands():
        if any(skip in command for skip in NOT_RUN) or not command.startswith(".venv/"):
            continue
        # Every such command is `centermask ...` (shlex splits and unquotes as the shell would).
        assert command.startswith(".venv/bin/centermask "), command
        in_folder(clone, shlex.split(command)[1:])
        ran += 1
    assert ran >= 12


@pytest.mark.slow
def test_the_python_example_runs_as_written(clone, monkeypatch):
    (python,) = blocks("python")
    monkeypatch.chdir(clone)
    exec(compile(python, "README.md", "exec"), {})
    assert (clone / "work" / "presets" / "shapes" / "digests.json").is_file()
