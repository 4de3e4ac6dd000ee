"""Every command's --help reads cleanly: each option explained, no reST markup or doubled %."""

from __future__ import annotations

import argparse

from moa_plan.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "moa-plan"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_option_has_help_and_the_text_is_clean():
    for name, parser in _parsers(build_parser()):
        text = parser.format_help()
        assert "``" not in text and "%%" not in text, (name, text)
        missing = [
            a.option_strings or a.dest
            for a in parser._actions
            if a.help is None and not isinstance(a, argparse._SubParsersAction)
        ]
        assert not missing, (name, missing)


def test_bounds_read_as_powers_of_two(capsys):
    import pytest

    from moa_plan.cli import main

    with pytest.raises(SystemExit):
        main(["density", "x.json", "--length", "0"])
    assert "must be in [1, 2^40], got 0" in capsys.readouterr().err


def test_validate_reports_density_at_the_lengths_a_plan_was_searched_at(tmp_path, capsys):
    from moa_plan.cli import main
    from moa_plan.io import save_plan
    from moa_plan.plan import ModelShape, Plan, Rule

    shape = ModelShape(
        num_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=8192
    )
    plan = Plan(
        format_version=1,
        model=shape,
        sink=4,
        default=Rule(alpha=60, beta=0.0),
        provenance={"lengths": [256, 512], "validation_length": 1024},
    )
    save_plan(plan, tmp_path / "p.json")
    assert main(["validate", str(tmp_path / "p.json")]) == 0
    assert capsys.readouterr().out == (
        f"{tmp_path / 'p.json'}: ok (1 layers x 2 heads, 1 KV heads, density 0.2500 at "
        "N=256, 0.1250 at N=512, 0.0625 at N=1024)\n"
    )
    plan.provenance.clear()
    save_plan(plan, tmp_path / "p.json")
    assert main(["validate", str(tmp_path / "p.json")]) == 0
    assert capsys.readouterr().out.endswith("density 0.0078 at N=8192)\n")  # max_position_embeddings


def test_validate_names_a_model_config_for_what_it_is(tmp_path, capsys):
    import json

    from moa_plan.cli import main

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "hidden_size": 32,
                "vocab_size": 10,
            }
        )
    )
    assert main(["validate", str(config)]) == 1
    assert capsys.readouterr().err == (
        f"{config}: this is a transformers model config, not a plan: pass it as "
        "--model (e.g. moa-plan uniform --model CONFIG --density 0.5 --out plan.json)\n"
    )
