"""Overrides checked before Hydra sees them, so that a slip costs one line that names the fix.

Hydra answers a misspelt key (``train.metasteps=5``) with advice to add it as a new key
(``+train.metasteps=5``), which validation then refuses, and an unknown option of a config group
(``algorithm=imal``) with a dozen lines. Here the first gets the closest real key and the second
the group's options. A key outside the validated schema (a custom model's argument, say) is
looked up in the config composed with the command line's group choices, so this check never
refuses what Hydra would accept. Configs from elsewhere (``-cd``, ``-cp``, ``-cn``,
``hydra.searchpath``) may bring groups and keys this package does not have: Hydra judges those
command lines alone.
"""

import argparse
import functools
import itertools
import sys
from importlib import resources

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser

from imaml_cli.config import SCHEMA, unknown_key
from imaml_cli.errors import UserError, exit_on_user_error

# With these Hydra prints help or information and does not run the command.
NOT_A_RUN = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc"}
MULTIRUN = {"-m", "--multirun"}
# A sweep with more jobs than this has each swept value checked beside the others' first values,
# not every combination (composing a config takes tens of milliseconds).
EVERY_COMBINATION_UP_TO = 64
CONFIG_PACKAGE = "imaml_cli.conf"


def group_options() -> dict[str, list[str]]:
    """Each config group of ours (a folder of the config package) and its options."""
    return {folder.name: sorted(f.name[:-len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))
            for folder in resources.files(CONFIG_PACKAGE).iterdir()
            if folder.is_dir() and folder.name not in ("hydra", "__pycache__")}


def _known(key: str, keys) -> bool:
    return any(k == key or k.startswith(key + ".") for k in keys)


def _config_keys(config_name: str, choices: list[str]) -> list[str] | None:
    """Every key of the config composed with these group choices; None if it does not compose."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    def flat(node, prefix=""):
        for key, value in node.items():
            yield from flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]

    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        try:
            return list(flat(OmegaConf.to_container(compose(config_name, overrides=choices))))
        except Exception:  # Hydra will say what is wrong with the choices
            return None


def _other_configs(args: list[str]) -> bool:
    """Whether the command line points Hydra at configs outside this package."""
    # Hydra's own parser (private, but hydra-core is pinned to 1.3), so that every spelling it takes
    # (--config-dir=X, -cd X, an abbreviation) counts.
    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        options, _ = parser.parse_known_args(args)
    except argparse.ArgumentError:  # Hydra will refuse the command line itself
        return True
    return any((options.config_dir, options.config_path, options.config_name))


def check_overrides(args: list[str], config_name: str, extra_keys: tuple[str, ...] = ()) -> None:
    """Raise a UserError for an unknown group option or a key the config does not have."""
    if NOT_A_RUN & set(args) or _other_configs(args):
        return
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # a malformed override: Hydra's own message says what is wrong with it
        return
    if any(o.key_or_group == "hydra.searchpath" for o in overrides):
        return
    groups = group_options()
    keys = [*SCHEMA, *extra_keys]
    choices, unknown, swept_group = [], [], False
    for override in overrides:
        key = override.key_or_group
        if key.split("/")[0].split(".")[0] == "hydra" or override.is_delete() or override.package:
            continue
        if key in groups:
            values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                      else [override.get_value_element_as_str()])
            for value in values:
                if value != "null" and value not in groups[key]:
                    raise UserError(f"{key}={value} is not an option; choose {key}= one of {', '.join(groups[key])}")
            if override.is_sweep_override():
                swept_group = True
            else:
                choices.append(override.input_line)
        elif not (override.is_add() or override.is_force_add()) and not _known(key, keys):
            unknown.append(key)
    # Which config a key belongs to is not known before a swept group is chosen: Hydra judges those.
    composed = _config_keys(config_name, choices) if unknown and not swept_group else None
    for key in unknown:
        if composed is not None and not _known(key, composed):
            raise unknown_key(key, composed)
    if config_name == "train" and MULTIRUN & set(args):
        check_sweep_jobs([o for o in overrides if o.key_or_group.split("/")[0].split(".")[0] != "hydra"])


def check_sweep_jobs(overrides) -> None:
    """Validate the config of every job a ``-m`` sweep will run, before the first one starts: a bad
    value in a later job would otherwise end the sweep after hours of the jobs before it.

    Swept values the sweeper draws itself (an optuna interval) take the config's value here."""
    from hydra import compose, initialize_config_module

    from imaml_cli.config import validate

    choices = []
    for override in overrides:
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # not a list of values: the sweeper draws them
            continue
        prefix = override.input_line.split("=", 1)[0]
        choices.append([f"{prefix}={value}" for value in values])
    if all(len(c) == 1 for c in choices):
        return
    jobs = list(itertools.product(*choices))
    if len(jobs) > EVERY_COMBINATION_UP_TO:
        jobs = [tuple(c[0] if i != j else value for i, c in enumerate(choices))
                for j, swept in enumerate(choices) for value in swept]
    with initialize_config_module(CONFIG_PACKAGE, version_base="1.3"):
        for job in jobs:
            try:
                validate(compose("train", overrides=list(job)))
            except UserError as error:
                swept = " ".join(o for o, c in zip(job, choices) if len(c) > 1)
                raise UserError(f"the sweep's job with {swept} would fail: {error}; nothing was run") from None
            except Exception:  # Hydra itself refuses this job's command line: it will say why
                return


def checks_overrides(config_name: str, extra_keys: tuple[str, ...] = ()):
    """Decorate a ``@hydra.main`` function with ``check_overrides`` of the command line."""

    def decorate(hydra_main):
        @functools.wraps(hydra_main)
        def main():
            with exit_on_user_error():
                check_overrides(sys.argv[1:], config_name, extra_keys)
            return hydra_main()

        return main

    return decorate
