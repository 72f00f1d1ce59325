"""The prompt set: words x templates, tokenised with position roles and target candidates."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from extract.config import ConfigError, check_templates
from store.schema import Role


class PromptError(Exception):
    """A user-facing problem with words, templates or the chat template."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: its tokens, what each position is, and how the answer could start."""

    index: int
    word: str
    template_index: int
    template: str
    text: str  # the full text the model sees (chat template applied)
    input_ids: tuple[int, ...]
    token_text: tuple[str, ...]
    roles: tuple[int, ...]  # store.schema.Role per position (FIRST and LAST win over WORD)
    # (form, first token id, number of tokens) for: word, " word", Word, " Word"
    candidates: tuple[tuple[str, int, int], ...]
    # The word's token positions [word_start, word_end): kept apart from the roles because in a
    # raw prompt the word is usually the last token, whose role is LAST.
    word_start: int = -1
    word_end: int = -1

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


def default_words() -> list[str]:
    return parse_words(resources.files("extract").joinpath("data/words.txt").read_text(), "default word list")


def read_words(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"word file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read word file {path}: {e}") from None
    return parse_words(text, str(path))


def parse_words(text: str, source: str) -> list[str]:
    """One word per line; blank lines and # comments skipped; empty or duplicate lists refused."""
    words: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        w = raw.strip()
        if not w or w.startswith("#"):
            continue
        if any(c.isspace() for c in w) or "{" in w or "}" in w:
            raise PromptError(f"{source}:{n}: {w!r} is not a single word (one word per line)")
        words.append(w)
    if not words:
        raise PromptError(f"{source} holds no words (one word per line)")
    dupes = sorted({w for w in words if words.count(w) > 1})
    if dupes:
        raise PromptError(f"{source} repeats {', '.join(dupes)}; each word must appear once")
    return words


def sha(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def bos_id(tok) -> int:
    """The BOS to prepend: the tokenizer's, else <|endoftext|> (what TransformerLens uses for Qwen)."""
    if tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    tid = tok.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tid != tok.unk_token_id:
        return tid
    raise ConfigError("`prepend_bos`: this tokenizer has no BOS token and no <|endoftext|>", "prepend_bos")


def render(tok, content: str, *, chat: bool, system_prompt: str | None) -> str:
    if not chat:
        return content
    if not getattr(tok, "chat_template", None):
        raise ConfigError("the tokenizer has no chat template; give `chat_template_file` or `chat_template`=False",
                          "chat_template_file", "chat_template")
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
    msgs.append({"role": "user", "content": content})
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def build_prompts(
    tok,
    words: list[str],
    templates: tuple[str, ...],
    *,
    chat: bool = True,
    system_prompt: str | None = None,
    prepend_bos: bool = False,
) -> list[Prompt]:
    """Tokenise every (template, word) with offsets, so each token knows whether it is the word."""
    check_templates(templates)
    bos = bos_id(tok) if prepend_bos else None
    out: list[Prompt] = []
    for ti, template in enumerate(templates):
        for word in words:
            content = template.replace("{word}", word)
            text = render(tok, content, chat=chat, system_prompt=system_prompt)
            # The word's character span: inside the last copy of the user content.
            at = text.rfind(content)
            if at < 0:
                raise PromptError(f"the chat template changed the prompt text {content!r}; "
                                  "pass --no-chat-template or another --chat-template")
            start = at + template.index("{word}")
            span = (start, start + len(word))
            enc = tok(text, add_special_tokens=not chat, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            offsets = [tuple(o) for o in enc["offset_mapping"]]
            if bos is not None and (not ids or ids[0] != bos):
                # never two: a tokenizer that adds its BOS itself, or a chat template that
                # starts with it (SmolLM2's <|im_start|>), already put it at position 0
                ids.insert(0, bos)
                offsets.insert(0, (0, 0))
            roles = []
            for a, b in offsets:
                if b > span[0] and a < span[1] and b > a:
                    roles.append(Role.WORD)
                elif a >= span[1] and roles and Role.WORD in roles:
                    roles.append(Role.SUFFIX)
                else:
                    roles.append(Role.TEMPLATE)
            if Role.WORD not in roles:
                raise PromptError(f"could not locate the word {word!r} in its tokens")
            in_word = [i for i, r in enumerate(roles) if r == Role.WORD]
            roles[0] = Role.FIRST
            roles[-1] = Role.LAST
            out.append(Prompt(
                index=len(out),
                word=word,
                template_index=ti,
                template=template,
                text=text,
                input_ids=tuple(int(i) for i in ids),
                token_text=tuple(tok.decode([i]) for i in ids),
                roles=tuple(int(r) for r in roles),
                candidates=target_candidates(tok, word),
                word_start=in_word[0],
                word_end=in_word[-1] + 1,
            ))
    return out


def target_candidates(tok, word: str) -> tuple[tuple[str, int, int], ...]:
    """How the answer could start: the word with or without a leading space or capital."""
    forms = [word, " " + word, word[:1].upper() + word[1:], " " + word[:1].upper() + word[1:]]
    seen: dict[str, tuple[str, int, int]] = {}
    for form in forms:
        ids = tok(form, add_special_tokens=False)["input_ids"]
        if ids and form not in seen:
            seen[form] = (form, int(ids[0]), len(ids))
    return tuple(seen.values())


def choose_target(prompt: Prompt, logits: np.ndarray) -> tuple[str, int, bool]:
    """The candidate whose first token the model ranks highest: the answer as it would write it."""
    form, tid, n = max(prompt.candidates, key=lambda c: float(logits[c[1]]))
    return form, tid, n > 1


_STRIP = "\"'`*_.,!?;:()[]"


def is_echo(word: str, generation: str) -> bool:
    """Does the continuation start by saying the word? Case, quotes and punctuation aside."""
    parts = generation.split()
    return bool(parts) and parts[0].strip(_STRIP).lower() == word.lower()


def is_exact_echo(word: str, generation: str) -> bool:
    """Is the continuation the word and nothing else (case, quotes, final punctuation aside)?"""
    parts = generation.split()
    return len(parts) == 1 and is_echo(word, generation)
