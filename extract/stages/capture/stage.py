"""The capture stage: one clean forward per batch of equal-length prompts -> one prompt shard each.

Per prompt (store.schema.F): the tokens, every activation the study reads (extract.stages.capture
.engine), the attention-sink captures (.sinks), the greedy continuation and the invariant
checks. Batches are prompts of equal token count (no padding, so batching is exact), cut from
the whole prompt set: a resumed run recomputes a batch exactly as the first run composed it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from extract.models.families import Adapter
from extract.stages.base import Job, Loaded, PlanInput, Shard, Tick
from extract.stages.capture.engine import Derived, capture, derive, greedy_continue
from extract.stages.capture.sinks import add_sink_arrays
from extract.stages.prompts import Prompt, choose_target, is_echo, is_exact_echo
from store.schema import PROMPTS_DIR, F
from store.warehouse import validation_array


def batches(prompts: list[Prompt], size: int) -> list[list[Prompt]]:
    """Group by token count (equal lengths need no padding, so batching is exact)."""
    groups: dict[int, list[Prompt]] = defaultdict(list)
    for p in prompts:
        groups[p.n_tokens].append(p)
    out = []
    for _, g in sorted(groups.items()):
        out.extend(g[i : i + size] for i in range(0, len(g), size))
    return out


def eos_ids(adapter: Adapter, tok) -> set[int]:
    ids: set[int] = set()
    gen = getattr(adapter.model, "generation_config", None)
    for src in (getattr(gen, "eos_token_id", None), tok.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


@dataclass(frozen=True)
class Captured:
    """One prompt's results: its target choice, derived arrays and greedy continuation."""

    prompt: Prompt
    form: str  # how the target token was found (store attr target_form)
    target_id: int
    multi: bool  # the word spans several tokens
    derived: Derived
    generated: list[int]


def compute_batch(adapter: Adapter, batch: list[Prompt], top_k: int, head_out_all: bool,
                  max_new_tokens: int, eos: set[int]) -> list[Captured]:
    """One extraction batch (prompts of equal length): the clean run, derived, continued."""
    dev = adapter.lm_head.weight.device
    ids = torch.tensor([p.input_ids for p in batch], device=dev)  # (B, T)
    cap = capture(adapter, ids)
    logits_np = cap.logits.cpu().numpy()  # (B, V)
    chosen = [choose_target(p, logits_np[i]) for i, p in enumerate(batch)]
    derived = derive(adapter, cap, [c[1] for c in chosen], top_k, head_out_all)
    add_sink_arrays(adapter, cap, derived, top_k)  # value/key/query norms, massive activations
    gens = greedy_continue(adapter, cap, max_new_tokens, eos)
    del cap
    return [Captured(p, *c, d, g) for p, c, d, g in zip(batch, chosen, derived, gens, strict=True)]


def prompt_shard(c: Captured, tok, tolerance: float, fingerprint: str) -> Shard:
    """A prompt shard's datasets (store.schema.F order) and attributes."""
    p, d = c.prompt, c.derived
    text = tok.decode(c.generated, skip_special_tokens=True)
    rows = [(name, e[0], e[1], tolerance, bool(e[1] <= tolerance)) for name, e in d.errors.items()]
    unknown = set(d.arrays) - set(F.ALL)
    assert not unknown, f"derived arrays outside store.schema.F: {unknown}"
    arrays = {F.INPUT_IDS: np.array(p.input_ids, np.int32), F.TOKEN_TEXT: p.token_text,
              F.POSITION_ROLE: np.array(p.roles, np.int8)}
    arrays.update((f, d.arrays[f]) for f in F.ALL if f in d.arrays)
    arrays[F.GENERATED_IDS] = np.array(c.generated, np.int32)
    arrays[F.VALIDATION] = validation_array(rows)
    missing = [f.name for f in F.ALL if not f.optional and f not in arrays]
    assert not missing, f"prompt shard without {missing}"
    top1 = int(np.argmax(d.arrays[F.FINAL_LOGITS]))
    attrs = {
        "prompt_index": p.index, "word": p.word, "template_index": p.template_index,
        "template": p.template, "text": p.text, "fingerprint": fingerprint,
        "n_tokens": p.n_tokens, "word_start": p.word_start, "word_end": p.word_end,
        "target_id": c.target_id, "target_text": tok.decode([c.target_id]),
        "target_form": c.form, "word_multi_token": c.multi, "top1_id": top1,
        "generation": text, "echo_first_token": top1 == c.target_id, "echo_correct": is_echo(p.word, text),
        "echo_exact": is_exact_echo(p.word, text),
    }
    return Shard(PROMPTS_DIR, p.index, arrays, attrs)


class CaptureStage:
    """Today's extraction as a stage (module docstring)."""

    name = "extract"
    unit = "prompt"
    count = "prompts"

    def __init__(self) -> None:
        self._eos: set[int] | None = None

    def plan(self, inp: PlanInput) -> list[Job]:
        done = inp.done(PROMPTS_DIR)
        jobs = []
        for b in batches(inp.prompts, inp.batch_size):
            todo = tuple(p.index for p in b if p.index not in done)
            if todo:
                jobs.append(Job(self.name, tuple(p.index for p in b), todo, len(todo)))
        return jobs

    def run(self, job: Job, model: Loaded, tick: Tick) -> list[Shard]:
        cfg = model.cfg
        if self._eos is None:
            self._eos = eos_ids(model.adapter, model.tok)
        batch = [model.by_index[i] for i in job.members]
        items = compute_batch(model.adapter, batch, cfg.top_k, cfg.head_out_all_positions,
                              cfg.max_new_tokens, self._eos)
        shards = [prompt_shard(c, model.tok, model.tolerance, model.fingerprint)
                  for c in items if c.prompt.index in job.todo]
        tick(len(shards))
        return shards
