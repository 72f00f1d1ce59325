"""`echowh extract`'s options, generated from ExtractConfig: one place documents each setting.

For every config field: the help text is the field's docstring (extract.config.field_docs, the
"(fingerprint)" tag dropped), a ``Literal[...]`` is a ``click.Choice``, the default is the
field's, and a tuple is typed once on the command line and read by the one parser of its type
(``PARSERS``). What the CLI adds is only the spelling: the flag(s), a file for the words, a
negating flag, ranges. ``FLAGS`` (field -> flag) is how a library error naming a field
(`ablate_layers`, extract.config.ConfigError) is shown to a CLI user (``as_flags``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click

from extract.config import (
    AblationModeName,
    CircuitKind,
    CircuitMethod,
    CircuitReplacement,
    ExtractConfig,
    choices,
    field_docs,
)


def parse_modes(text: str) -> tuple[str, ...]:
    """``none`` or ``zero,sink`` -> the ablation modes, each once, in order."""
    if text.strip().lower() == "none":
        return ()
    modes = tuple(m.strip().lower() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in choices(AblationModeName)]
    if bad or not modes:
        raise click.BadParameter(f"use none or a comma-separated list of {', '.join(choices(AblationModeName))}")
    return tuple(dict.fromkeys(modes))


def parse_ints(text: str) -> tuple[int, ...] | None:
    """``all``, or 0-based indices: ``20,21,22``, ranges ``18-25`` (both ends included)."""
    if text.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if lo > hi:
                    raise click.BadParameter(f"{part.strip()}: the range starts after it ends (write {hi}-{lo})")
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise click.BadParameter("use all, or 0-based layer numbers like 20,21,22 or 18-25") from None
    return tuple(sorted(set(out)))


def parse_int_pairs(text: str) -> tuple[tuple[int, int], ...]:
    """``a:b,c:d`` -> ((a, b), (c, d)); checked against the templates by the config."""
    out = []
    for part in text.split(","):
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise click.BadParameter(f"{part.strip()!r} is not a:b (0-based template numbers, e.g. 0:1)") from None
        out.append((a, b))
    return tuple(out)


def parse_choice_list(lit: Any) -> Callable[[str], tuple[str, ...]]:
    """A parser of ``none`` or ``a,b`` with values of ``lit`` (each once, in order)."""

    def parse(text: str) -> tuple[str, ...]:
        if text.strip().lower() in ("none", ""):
            return ()
        vals = tuple(dict.fromkeys(v.strip().lower() for v in text.split(",") if v.strip()))
        bad = [v for v in vals if v not in choices(lit)]
        if bad:
            raise click.BadParameter(f"{', '.join(bad)}: use none or a comma-separated list of {', '.join(choices(lit))}")
        return vals

    return parse


def parse_floats(text: str) -> tuple[float, ...]:
    """``0,0.5,1`` -> (0.0, 0.5, 1.0), each once, in order."""
    try:
        return tuple(dict.fromkeys(float(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise click.BadParameter("use comma-separated numbers like 0,0.5,1,2") from None


# One parser per tuple type of a config field (the annotation, None removed).
PARSERS: dict[Any, Callable[[str], Any]] = {
    tuple[AblationModeName, ...]: parse_modes,
    tuple[int, ...]: parse_ints,
    tuple[tuple[int, int], ...]: parse_int_pairs,
    tuple[CircuitKind, ...]: parse_choice_list(CircuitKind),
    tuple[CircuitMethod, ...]: parse_choice_list(CircuitMethod),
    tuple[CircuitReplacement, ...]: parse_choice_list(CircuitReplacement),
    tuple[float, ...]: parse_floats,
}


@dataclass(frozen=True)
class Flag:
    """How a config field is spelled on the command line (everything else comes from the field)."""

    decls: tuple[str, ...]  # the flag first (errors show it), then short forms
    click: dict[str, Any] = field(default_factory=dict)  # a range, a path type, multiple, metavar
    negate: bool = False  # a bool field set False by the flag (--no-chat-template, --quiet)
    text: str = ""  # what the CLI adds to the help (the spelling of a tuple)


FLAG_SPEC: dict[str, Flag] = {
    "model": Flag(("--model", "-m")),
    "out": Flag(("--out", "-o"), {"type": click.Path(path_type=Path, file_okay=False)}),
    "resume": Flag(("--resume",)),
    "allow_env_change": Flag(("--allow-env-change",)),
    "words": Flag(("--words",), {"type": click.Path(path_type=Path, dir_okay=False)}),
    "templates": Flag(("--template",), {"multiple": True}, text="Repeat the flag for several."),
    "chat_template": Flag(("--no-chat-template",), negate=True),
    "chat_template_file": Flag(("--chat-template",),
                               {"type": click.Path(path_type=Path, dir_okay=False, exists=True)}),
    "system_prompt": Flag(("--system-prompt",)),
    "prepend_bos": Flag(("--prepend-bos",)),
    "dtype": Flag(("--dtype",)),
    "device": Flag(("--device",)),
    "store_dtype": Flag(("--store-dtype",)),
    "max_new_tokens": Flag(("--max-new-tokens",), {"type": click.IntRange(1, 256)}),
    "top_k": Flag(("--top-k",), {"type": click.IntRange(1, 100)}),
    "head_out_all_positions": Flag(("--head-out-all-positions",)),
    "batch_size": Flag(("--batch-size",), {"type": click.IntRange(1, 512)}),
    "ablation": Flag(("--ablation",), text="Comma-separated, or none."),
    "ablate_positions": Flag(("--ablate-positions",)),
    "ablate_layers": Flag(("--ablate-layers",), text="all, 20,21,22, or 18-25 (both ends included)."),
    "patching": Flag(("--patching/--no-patching",)),
    "patch_pairs": Flag(("--patch-pairs",), text="As a:b, comma-separated (e.g. 0:1,0:2)."),
    "circuits": Flag(("--circuits",), text="Comma-separated (template,word), or none."),
    "circuit_methods": Flag(("--circuit-methods",), text="Comma-separated."),
    "circuit_steps": Flag(("--circuit-steps",), {"type": click.IntRange(1, 100)}),
    "circuit_replacements": Flag(("--circuit-replacements",), text="Comma-separated."),
    "task_vectors": Flag(("--task-vectors/--no-task-vectors",)),
    "tv_demos": Flag(("--tv-demos",), {"type": click.IntRange(1, 50)}),
    "tv_coefficients": Flag(("--tv-coefficients",), text="Comma-separated, e.g. 0,0.5,1,2,4,8."),
    "tv_steer_stride": Flag(("--tv-steer-stride",), {"type": click.IntRange(1, 1000)}),
    "progress": Flag(("--quiet", "-q"), negate=True),
}
NOT_OPTIONS = ("extra",)  # set by the CLI itself (the command line, recorded in the manifest)
FLAGS = {name: f.decls[0].split("/")[0] for name, f in FLAG_SPEC.items()}


def as_flags(message: str) -> str:
    """A library message naming config fields (`ablate_layers`) as the CLI's flags (--ablate-layers)."""
    return re.sub(r"`(\w+)`(?:=False)?", lambda m: FLAGS.get(m.group(1), m.group(1)), message)


def _bare(tp: Any) -> Any:
    """The annotation without ``| None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def help_text(doc: str, flag: Flag) -> str:
    """The field's docstring (a negating flag says so first) and the CLI's note on the spelling."""
    doc = doc.removeprefix("(fingerprint) ")
    return " ".join(x for x in ("Switches off (on by default):" if flag.negate else "", doc, flag.text) if x)


def option(f: dataclasses.Field, doc: str, hints: dict[str, Any]) -> Callable:
    """The click option of one config field."""
    spec = FLAG_SPEC[f.name]
    tp = _bare(hints[f.name])
    default = f.default if f.default is not dataclasses.MISSING else None
    kw: dict[str, Any] = {"help": help_text(doc, spec), **spec.click}
    if tp is bool:
        if "/" not in spec.decls[0]:
            kw["is_flag"] = True
        kw["default"] = (not default) if spec.negate else default
        if "/" in spec.decls[0]:
            kw["show_default"] = True
    elif typing.get_origin(tp) is Literal:
        kw.update(type=click.Choice(list(typing.get_args(tp))), default=default, show_default=True)
    elif tp in PARSERS:
        parse = PARSERS[tp]
        kw["callback"] = lambda ctx, param, v, parse=parse: None if v is None else parse(v)
        kw["default"] = None
        if default is not None:
            kw["default"] = (",".join(map(str, default)) or "none") if isinstance(default, tuple) else str(default)
            kw["show_default"] = True
    elif not kw.get("multiple"):
        kw.update(default=default, show_default=default is not None and tp is not Path)
        if tp is int and "type" not in kw:
            kw["type"] = int
    if tp is Path and default is not None:
        kw.update(default=default, show_default=True)
    return click.option(*spec.decls, f.name, **kw)


def config_options(fn: Callable) -> Callable:
    """Decorate a click command with one option per ExtractConfig field (field order in --help)."""
    docs = field_docs()
    hints = typing.get_type_hints(ExtractConfig, include_extras=True)
    fields = [f for f in dataclasses.fields(ExtractConfig) if f.name not in NOT_OPTIONS]
    missing = [f.name for f in fields if f.name not in FLAG_SPEC]
    assert not missing, f"ExtractConfig fields without a CLI spelling: {missing}"
    for f in reversed(fields):
        fn = option(f, docs[f.name], hints)(fn)
    return fn


def field_values(values: dict[str, Any]) -> dict[str, Any]:
    """The command's parsed options -> ExtractConfig keyword arguments (negations undone;
    no --template keeps the config's default templates)."""
    out = {}
    for name, v in values.items():
        spec = FLAG_SPEC[name]
        if spec.negate:
            v = not v
        if spec.click.get("multiple"):
            if not v:
                continue
            v = tuple(v)
        out[name] = v
    return out
