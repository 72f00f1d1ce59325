"""`echowh extract`'s options are ExtractConfig's fields: one doc, one default, one choice list.

Checked against the config independently of the generator: the dataclass's own fields and
annotations, and the docstrings as Python's ``ast`` reads them from the source.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

import click
import pytest

from echowh.cli_extract import extract as command
from echowh.extract_options import FLAGS, as_flags, parse_int_pairs, parse_ints, parse_modes
from extract.config import ConfigError, ExtractConfig, check_model_fit

FIELDS = [f for f in dataclasses.fields(ExtractConfig) if f.name != "extra"]
PARAMS = {p.name: p for p in command.params}


def _docs() -> dict[str, str]:
    body = ast.parse(inspect.getsource(ExtractConfig)).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:], strict=False)
            if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)}


def test_every_field_is_one_option_documented_by_its_docstring():
    docs = _docs()
    assert set(PARAMS) >= {f.name for f in FIELDS}
    for f in FIELDS:
        doc = docs[f.name].removeprefix("(fingerprint) ")
        assert doc in PARAMS[f.name].help, f.name  # the help text is the field's docstring
        assert PARAMS[f.name].opts[0] == FLAGS[f.name] or f.name == "patching", f.name


def test_literals_are_choices_and_defaults_are_the_configs():
    hints = typing.get_type_hints(ExtractConfig)
    for f in FIELDS:
        p = PARAMS[f.name]
        if typing.get_origin(hints[f.name]) is typing.Literal:
            assert isinstance(p.type, click.Choice) and list(p.type.choices) == list(typing.get_args(hints[f.name]))
        if f.name in ("templates", "words"):
            continue  # a repeated flag / a file: the config's default when absent
        default = p.default
        if p.callback is not None and isinstance(default, str):
            default = p.callback(None, p, default)
        if f.name in ("chat_template", "progress"):
            default = not default  # --no-chat-template, --quiet
        assert default == f.default, f.name


def test_parsers_one_per_tuple_type():
    assert parse_modes("zero, mean,zero") == ("zero", "mean") and parse_modes("none") == ()
    assert parse_ints("3,1-2") == (1, 2, 3) and parse_ints("all") is None
    assert parse_int_pairs("0:1,0:2") == ((0, 1), (0, 2))
    for bad, parse in (("zero,x", parse_modes), ("2-1", parse_ints), ("x", parse_ints), ("0-1", parse_int_pairs)):
        with pytest.raises(click.BadParameter):
            parse(bad)


def test_library_errors_name_fields_and_the_cli_shows_flags():
    cfg = ExtractConfig(ablate_layers=(3, 99), ablation=("zero",))
    with pytest.raises(ConfigError) as e:
        check_model_fit(cfg, 3)
    assert str(e.value) == "`ablate_layers` 3,99 is outside this model's layers 0-2" and e.value.fields == ("ablate_layers",)
    assert as_flags(str(e.value)) == "--ablate-layers 3,99 is outside this model's layers 0-2"
    with pytest.raises(ConfigError) as e:
        ExtractConfig(chat_template=False, system_prompt="x")
    assert as_flags(str(e.value)) == ("--system-prompt only apply with the chat template, which "
                                      "--no-chat-template switches off; drop one of them")
    with pytest.raises(ConfigError, match=r"^`patch_pairs`: 0:0 pairs a template with itself$"):
        ExtractConfig(patching=True, patch_pairs=((0, 0),))
