"""The prompt sets of the task-vector study (docs/specs/taskvec.md, "Prompt sets").

Deterministic from the word list alone (no seed): words in list order, even indices train,
odd indices held out. Every kind of prompt is built by ``extract.stages.prompts.build_prompts`` with a
per-word "template", so the chat wrapping, tokenisation, word span and target candidates are the
project's own:

- ``demo``: "w1 -> w1\\n...\\nwn -> wn\\nx ->", the n train words that follow x cyclically;
- ``zero_shot``: "x ->";
- ``shuffled``: the demo prompt with labels rotated by one (w1 -> w2, ..., wn -> w1);
- ``repeat`` / ``echo``: the study's instruction templates; ``neutral``: without the verb.

Choice where the spec is open: "the n train words that follow x's position cyclically in the
train list" for a held-out x (not in the train list) is read as the train words that come after
x in the whole list's order: for x at list index i the first demonstration is train word
i // 2 + 1 (mod the train count), for train and held-out x alike; x itself is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from extract.stages.prompts import Prompt, PromptError, build_prompts
from store.taskvec_schema import Kind

ARROW = " -> "
N_DEMOS = 5
TEMPLATES: dict[Kind, str] = {
    Kind.REPEAT: "repeat the following word: {word}",
    Kind.ECHO: "echo the following word: {word}",
    Kind.NEUTRAL: "the following word: {word}",
    Kind.ZERO_SHOT: "{word}" + ARROW.rstrip(),
}
VERB_KINDS = (Kind.REPEAT, Kind.ECHO)  # prompts with a verb: steering "from the verb on"


@dataclass(frozen=True)
class Split:
    """Train words (vectors are built from them) and held-out words (everything is evaluated on)."""

    words: tuple[str, ...]
    train: tuple[str, ...] = field(init=False)
    held_out: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", self.words[0::2])
        object.__setattr__(self, "held_out", self.words[1::2])
        if len(self.train) < 2 or not self.held_out:
            raise PromptError("the task-vector study needs at least 3 words (2 train, 1 held out)")

    def demos(self, word: str, n: int) -> tuple[str, ...]:
        """The n train words following ``word`` in list order, cyclically, skipping it."""
        i = self.words.index(word)
        start = i // 2 + 1
        cycle = [self.train[(start + j) % len(self.train)] for j in range(len(self.train))]
        out = tuple(w for w in cycle if w != word)[:n]
        if len(out) < n:
            raise PromptError(f"{n} demonstrations need {n + 1} train words; the list gives {len(self.train)}: "
                              "pass more words or fewer --demos")
        return out


def demo_template(demos: tuple[str, ...], shuffled: bool = False) -> str:
    """ "w1 -> w1\\n...\\nwn -> wn\\n{word} ->"; shuffled: labels rotated by one (a derangement)."""
    labels = demos[1:] + demos[:1] if shuffled else demos
    lines = [f"{w}{ARROW}{lab}" for w, lab in zip(demos, labels, strict=True)]
    return "\n".join([*lines, TEMPLATES[Kind.ZERO_SHOT]])


@dataclass(frozen=True)
class TVPrompt:
    """One prompt of the study: its kind, word, the project's Prompt, and where the verb starts."""

    kind: Kind
    word: str
    prompt: Prompt
    verb_pos: int  # first token of the verb ("repeat"/"echo"); -1 for kinds without one

    @property
    def n_tokens(self) -> int:
        return self.prompt.n_tokens

    @property
    def candidate_ids(self) -> tuple[int, ...]:
        """First tokens of x, " x", X, " X": an argmax among them is echo-correct."""
        return tuple(sorted({c[1] for c in self.prompt.candidates}))


@dataclass(frozen=True)
class PromptSet:
    """Every prompt of the study for one tokenizer, and how it was built (``record``)."""

    split: Split
    n_demos: int
    chat: bool
    system_prompt: str | None
    prompts: dict[tuple[Kind, str], TVPrompt]

    def get(self, kind: Kind, word: str) -> TVPrompt:
        return self.prompts[(kind, word)]

    def of(self, kind: Kind, words: tuple[str, ...]) -> list[TVPrompt]:
        return [self.prompts[(kind, w)] for w in words]

    def record(self) -> dict:
        """A plain dict for the manifest: the split, the rule's parameters and every text."""
        return {
            "words": list(self.split.words), "train": list(self.split.train),
            "held_out": list(self.split.held_out), "n_demos": self.n_demos, "arrow": ARROW,
            "chat": self.chat, "system_prompt": self.system_prompt,
            "templates": {k.name.lower(): t for k, t in TEMPLATES.items()},
            "demos": {w: list(self.split.demos(w, self.n_demos)) for w in self.split.words},
            "texts": {f"{k.name.lower()}/{w}": p.prompt.text for (k, w), p in sorted(self.prompts.items())},
        }


def _verb_pos(tok, p: Prompt, template: str, chat: bool) -> int:
    """Index of the token holding the instruction's first character (the verb)."""
    content = template.replace("{word}", p.word)
    at = p.text.rfind(content)
    enc = tok(p.text, add_special_tokens=not chat, return_offsets_mapping=True)  # as build_prompts
    assert tuple(enc["input_ids"]) == p.input_ids, "re-tokenising the prompt changed its tokens"
    return next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > at and b > a)


def build_set(tok, words: list[str], *, n_demos: int = N_DEMOS, chat: bool = True,
              system_prompt: str | None = None) -> PromptSet:
    """Every kind for every word (the vectors read train words, the interventions held-out ones)."""
    split = Split(tuple(words))
    out: dict[tuple[Kind, str], TVPrompt] = {}

    def add(kind: Kind, word: str, template: str) -> None:
        (p,) = build_prompts(tok, [word], (template,), chat=chat, system_prompt=system_prompt)
        verb = _verb_pos(tok, p, template, chat) if kind in VERB_KINDS else -1
        out[(kind, word)] = TVPrompt(kind, word, p, verb)

    for w in split.words:
        demos = split.demos(w, n_demos)
        add(Kind.DEMO, w, demo_template(demos))
        add(Kind.SHUFFLED, w, demo_template(demos, shuffled=True))
        for kind, template in TEMPLATES.items():
            add(kind, w, template)
    return PromptSet(split, n_demos, chat, system_prompt, out)
