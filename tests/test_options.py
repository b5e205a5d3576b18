"""One option vocabulary: a flag means one thing in every subcommand, shows its default, old names hint."""

from __future__ import annotations

import argparse
import re

import pytest

from simdiff.cli.main import build_parser, configure_transformers, main
from simdiff.cli.options import recipe_from_args


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def visible_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def meaning(action: argparse.Action) -> tuple:
    """What a flag means: where its value goes, how it is read, and its help without the default."""
    kind = getattr(action.type, "__name__", str(action.type))
    return action.dest, kind, type(action).__name__, re.sub(r" \(default: .*\)$", "", action.help or "", flags=re.S)


def test_no_flag_has_two_meanings() -> None:
    seen: dict[str, dict[tuple, list[str]]] = {}
    for command, parser in subcommands().items():
        for action in visible_options(parser):
            for flag in action.option_strings:
                seen.setdefault(flag, {}).setdefault(meaning(action), []).append(command)
    clashes = {flag: meanings for flag, meanings in seen.items() if len(meanings) > 1}
    assert not clashes, clashes
    # the shared vocabulary really is shared: these flags exist in several commands with one meaning
    for flag in ("--calib-seq-len", "--eval-seq-len", "--criterion", "--ratio", "--dtype", "--out", "--seed"):
        assert sum(len(c) for c in seen[flag].values()) >= 3, (flag, seen[flag])


def test_every_option_shows_its_default() -> None:
    missing = [(command, action.option_strings[0]) for command, parser in subcommands().items()
               for action in visible_options(parser) if "(default: " not in (action.help or "")]
    assert not missing


@pytest.mark.parametrize("argv, new", [
    (["prune", "m", "--out", "o", "--num-layers", "1", "--seq-len", "32"], "--calib-seq-len"),
    (["eval", "m", "--seq-len=64"], "--eval-seq-len"),
    (["compare", "m", "--batch-size", "2"], "--calib-batch-size"),
    (["score", "m", "--criteria", "simdiff"], "--criterion"),
    (["compare", "m", "--ratios", "0.25"], "--ratio"),
    (["recover", "m", "--out", "o", "--alpha", "8"], "--lora-alpha"),
    (["recover", "m", "--out", "o", "--eval-max-tokens", "8"], "--max-tokens"),
])
def test_renamed_flags_fail_with_a_hint(argv, new, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simdiff: error: --") and "was renamed" in err[0], err
    assert new in err[0]


def test_alpha_stays_simdiffs_weight_where_it_is_one() -> None:
    args = build_parser().parse_args(["prune", "m", "--out", "o", "--num-layers", "1", "--alpha", "0.5"])
    assert recipe_from_args(args).options.alpha == 0.5
    recover = subcommands()["recover"]
    assert "--lora-alpha" in recover._option_string_actions
    assert recover._option_string_actions["--alpha"].help == argparse.SUPPRESS  # the hint only


def test_quiet_and_verbose_before_or_after_the_subcommand() -> None:
    parser = build_parser()
    base = ["prune", "m", "--out", "o", "--num-layers", "1"]
    assert parser.parse_args(["-q", *base]).quiet
    assert parser.parse_args([*base, "-q"]).quiet
    assert parser.parse_args([*base[:2], "-v", *base[2:]]).verbose
    plain = parser.parse_args(base)
    assert not plain.quiet and not plain.verbose


def test_quiet_silences_transformers_progress_bars() -> None:
    from transformers.utils import logging as hf_logging

    try:
        configure_transformers(quiet=True)
        assert not hf_logging.is_progress_bar_enabled()
        configure_transformers(quiet=False)
        assert hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_version(capsys) -> None:
    from simdiff import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"simdiff {__version__}"


def test_demo_help_shows_the_defaults_demo_uses() -> None:
    parser = subcommands()["demo"]
    recipe = recipe_from_args(build_parser().parse_args(["demo"]))
    helps = {a.option_strings[0]: a.help for a in visible_options(parser)}
    used = {"--samples": recipe.calibration.samples, "--limit": recipe.evaluation.limit,
            "--max-tokens": recipe.evaluation.max_tokens, "--ratio": recipe.selection.ratio[0],
            "--tasks": ",".join(recipe.evaluation.tasks), "--out": recipe.out}
    assert recipe.model.name == "smollm2-135m" and used["--samples"] == 8 and used["--tasks"] == "piqa"
    for flag, value in used.items():
        assert helps[flag].endswith(f"(default: {value})"), (flag, helps[flag])


def test_list_flags_take_comma_lists() -> None:
    args = build_parser().parse_args(["compare", "m", "--out", "o", "--num-layers", "4,8",
                                      "--criterion", "simdiff,simdiff:alpha=auto"])
    recipe = recipe_from_args(args)
    assert recipe.selection.num_layers == [4, 8] and recipe.is_comparison()
