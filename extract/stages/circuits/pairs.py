"""Counterfactual pairs of the circuits engine: (clean ids, corrupted ids) of EQUAL token length.

Two kinds (the spec, docs/specs/circuits.md "Pairs"):

- ``template``: one word under two templates ``a`` and ``b``, both directions: direction 0 has
  clean = template a's prompt and corrupted = template b's, direction 1 the reverse.
- ``word``: one template, the word replaced by the NEXT word of the word list (the prompts'
  word order), cyclically, whose prompt has the same token length and whose first word token
  differs (``input_ids[word_start]``); one pair per (template, word), clean = the word.

A pair of unequal length (template) or a word with no partner (word) is never built: it is
returned in ``PairSet.skipped`` with the reason, for the caller to report and record.
A pair's key is its clean prompt's index: unique within a kind for one template pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from extract.stages.prompts import Prompt

KINDS = ("template", "word")


@dataclass(frozen=True)
class CircuitPair:
    """Clean and corrupted prompts of one pair, position-aligned (equal length)."""

    kind: str  # 'template' | 'word'
    clean: Prompt
    corrupted: Prompt
    direction: int = 0  # template pairs: 0 = a is clean, 1 = b is clean; word pairs: 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"pair kind must be one of {KINDS}, not {self.kind!r}")
        if self.clean.n_tokens != self.corrupted.n_tokens:
            raise ValueError(f"a pair needs prompts of equal length, got {self.clean.n_tokens} and "
                             f"{self.corrupted.n_tokens} tokens; build pairs with template_pairs/word_pairs")

    @property
    def key(self) -> int:
        """The clean prompt's index: the shard name circuits/<kind>/pNNNNN.h5."""
        return self.clean.index

    @property
    def n_tokens(self) -> int:
        return self.clean.n_tokens


@dataclass(frozen=True)
class Skipped:
    """A pair that could not be built, and why."""

    kind: str
    clean: int  # prompt index
    corrupted: int  # prompt index, -1 when there was no candidate
    reason: str


@dataclass(frozen=True)
class PairSet:
    pairs: tuple[CircuitPair, ...]
    skipped: tuple[Skipped, ...]


def template_pairs(prompts: Sequence[Prompt], a: int = 0, b: int = 1) -> PairSet:
    """Both directions of every word present under templates a and b (word order)."""
    by = {(p.template_index, p.word): p for p in prompts}
    words = list(dict.fromkeys(p.word for p in prompts))
    pairs, skipped = [], []
    for w in words:
        if (a, w) not in by or (b, w) not in by:
            continue
        pa, pb = by[(a, w)], by[(b, w)]
        for r, (c, x) in enumerate(((pa, pb), (pb, pa))):
            if c.n_tokens != x.n_tokens:
                skipped.append(Skipped("template", c.index, x.index,
                                       f"lengths differ ({c.n_tokens} vs {x.n_tokens} tokens)"))
            else:
                pairs.append(CircuitPair("template", c, x, r))
    return PairSet(tuple(pairs), tuple(skipped))


def word_partner(prompt: Prompt, same_template: Sequence[Prompt]) -> Prompt | None:
    """The next prompt after ``prompt`` in word order, cyclically, of equal length whose first
    word token differs; None if there is none. ``same_template`` is in word order."""
    i = next(j for j, p in enumerate(same_template) if p.index == prompt.index)
    n = len(same_template)
    for step in range(1, n):
        q = same_template[(i + step) % n]
        if q.n_tokens == prompt.n_tokens and q.input_ids[q.word_start] != prompt.input_ids[prompt.word_start]:
            return q
    return None


def word_pairs(prompts: Sequence[Prompt], templates: Sequence[int] | None = None) -> PairSet:
    """One pair per (template, word): the word against its partner (``word_partner``)."""
    tpls = sorted({p.template_index for p in prompts}) if templates is None else list(templates)
    pairs, skipped = [], []
    for t in tpls:
        group = [p for p in prompts if p.template_index == t]  # prompts are built in word order
        for p in group:
            q = word_partner(p, group)
            if q is None:
                skipped.append(Skipped("word", p.index, -1, "no other word with the same token length "
                                       "and a different first token"))
            else:
                pairs.append(CircuitPair("word", p, q))
    return PairSet(tuple(pairs), tuple(skipped))


def build(kind: str, prompts: Sequence[Prompt], *, templates: tuple[int, int] = (0, 1)) -> PairSet:
    """The pairs of one kind (``template`` uses the template pair, ``word`` every template)."""
    if kind == "template":
        return template_pairs(prompts, *templates)
    if kind == "word":
        return word_pairs(prompts)
    raise ValueError(f"pair kind must be one of {KINDS}, not {kind!r}")
