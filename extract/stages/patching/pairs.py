"""Patching pairs: the two prompts of a word under two templates, and their aligned positions.

Positions are aligned by role, never guessed:

- the **shared prefix** (leading tokens equal in both prompts) aligns by index; by causality its
  activations are identical in both runs, so it is recorded (``Alignment.shared_prefix``) and
  never patched;
- the **common suffix** (trailing tokens equal in both prompts: the rest of the instruction, the
  word, the chat template's end) aligns from the end;
- the **middle** between them (where the templates differ, e.g. the verb) aligns by offset from
  its start only when both middles have the same number of tokens; otherwise its positions
  have no counterpart and are **unpatchable** (-1).

An aligned pair of positions must also have the same role (store.schema.Role); a pair whose
roles differ is unpatchable too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extract.config import ConfigError, check_pairs
from extract.stages.prompts import Prompt

UNPATCHABLE = -1


@dataclass(frozen=True)
class Alignment:
    """Destination position -> source position for one direction of a pair."""

    shared_prefix: int  # P: positions 0..P-1 hold the same tokens in both prompts
    dst_to_src: tuple[int, ...]  # per destination position: source position or UNPATCHABLE

    @property
    def patchable(self) -> list[int]:
        """Destination positions from the first differing token on that have a counterpart."""
        return [t for t in range(self.shared_prefix, len(self.dst_to_src)) if self.dst_to_src[t] >= 0]

    @property
    def unpatchable(self) -> list[int]:
        return [t for t, s in enumerate(self.dst_to_src) if s == UNPATCHABLE]


@dataclass(frozen=True)
class Pair:
    """The prompts of one word under templates ``a`` and ``b`` (direction 0: a into b)."""

    word: str
    a: Prompt
    b: Prompt

    @property
    def name(self) -> str:
        return f"{self.a.template_index}-{self.b.template_index}"

    def direction(self, r: int) -> tuple[Prompt, Prompt]:
        """(source, destination) of direction r: 0 = a into b, 1 = b into a."""
        return (self.a, self.b) if r == 0 else (self.b, self.a)


def align(dst: Prompt, src: Prompt) -> Alignment:
    """Role-aligned positions of ``dst`` in ``src`` (module docstring)."""
    d, s = dst.input_ids, src.input_ids
    n = min(len(d), len(s))
    P = 0
    while n > P and d[P] == s[P]:
        P += 1
    Q = 0
    while n - P > Q and d[-1 - Q] == s[-1 - Q]:
        Q += 1
    mid_d, mid_s = len(d) - P - Q, len(s) - P - Q
    out = []
    for t in range(len(d)):
        if t < P:
            j = t
        elif t >= len(d) - Q:
            j = t - len(d) + len(s)
        else:
            j = t if mid_d == mid_s else UNPATCHABLE
        if j != UNPATCHABLE and dst.roles[t] != src.roles[j]:
            j = UNPATCHABLE
        out.append(j)
    return Alignment(P, tuple(out))


def parse_pairs(text: str | None, n_templates: int) -> tuple[tuple[int, int], ...]:
    """``0:1,0:2`` -> ((0, 1), (0, 2)); None -> the first two templates. ConfigError if invalid."""
    if text is None or not text.strip():
        check_pairs(None, n_templates)
        return ((0, 1),)
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise ConfigError(f"`patch_pairs`: {part.strip()!r} is not a:b (template numbers, e.g. 0:1)",
                              "patch_pairs") from None
        out.append((a, b))
    check_pairs(tuple(out), n_templates)
    return tuple(out)


def build_pairs(prompts: Sequence[Prompt], pairs: Sequence[tuple[int, int]]) -> list[Pair]:
    """Every (template pair, word), in pair order then word order."""
    by = {(p.template_index, p.word): p for p in prompts}
    words = list(dict.fromkeys(p.word for p in prompts))
    return [Pair(w, by[(a, w)], by[(b, w)]) for a, b in pairs for w in words
            if (a, w) in by and (b, w) in by]
