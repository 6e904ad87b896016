"""imaml-train --help and imaml-eval --help: what the command does, its data, presets and examples
first, then Hydra's groups and config; the examples are commands that compose."""

import re
import shlex

import pytest

from conftest import REPO, compose, run_cli
from imaml_cli.config import validate

SECTIONS = ["== Data ==", "== Presets ==", "== Examples ==", "== Configuration groups ==", "== Config =="]


def help_text(script, tmp_path, *overrides):
    result = run_cli(script, "--help", *overrides, cwd=tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result.stdout


def examples(text, script):
    block = text.split("== Examples ==")[1].split("==")[0]
    return [shlex.split(line)[1:] for line in block.strip().splitlines() if line.startswith(script + " ")]


@pytest.fixture(scope="module")
def train_help(tmp_path_factory):
    return help_text("imaml-train", tmp_path_factory.mktemp("elsewhere"))


@pytest.fixture(scope="module")
def eval_help(tmp_path_factory):
    return help_text("imaml-eval", tmp_path_factory.mktemp("elsewhere"))


@pytest.mark.parametrize("name, opening", [("train", "imaml-train: meta-train a few-shot learner"),
                                           ("eval", "imaml-eval: test a trained checkpoint")])
def test_help_opens_with_the_command_then_data_presets_examples_groups_and_config(request, name, opening):
    text = request.getfixturevalue(f"{name}_help")
    assert text.startswith(opening)
    positions = [text.index(section) for section in SECTIONS]
    assert positions == sorted(positions)
    data = text.split("== Data ==")[1].split("== Presets ==")[0]
    assert "dataset.root" in data and "$IMAML_DATA_DIR" in data


def test_train_help_names_every_preset_and_group_and_shows_the_config(train_help):
    presets = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    head = train_help.split("== Configuration groups ==")[0]
    assert all(preset in head for preset in presets)
    groups = train_help.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = set(re.findall(r"^(\w+):", groups, flags=re.M))
    on_disk = {p.name for p in (REPO / "conf").iterdir() if p.is_dir() and p.name not in ("hydra", "__pycache__")}
    assert listed == on_disk
    assert "meta_steps: 20000" in train_help.split("== Config ==")[1]


def test_train_help_examples_are_three_commands_that_compose_and_validate(train_help):
    commands = examples(train_help, "imaml-train")
    assert len(commands) == 3
    for arguments in commands:
        overrides = [a for a in arguments if a != "-m"]
        config = validate(compose(overrides))
        for override in overrides:
            key, value = override.split("=", 1)
            if not key.startswith("hydra.") and "." in key:
                assert str(config[key.split(".")[0]][key.split(".")[1]]) == value


def test_eval_help_examples_compose(eval_help):
    commands = examples(eval_help, "imaml-eval")
    assert len(commands) == 3
    for arguments in commands:
        config = compose(arguments, config_name="eval")
        assert config.checkpoint.endswith("best.pt")


def test_help_shows_the_config_the_overrides_compose(tmp_path):
    text = help_text("imaml-train", tmp_path, "experiment=sinusoid")
    assert "name: sinusoid_mlp" in text.split("== Config ==")[1]
