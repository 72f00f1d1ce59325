"""Section "Run summary": the manifest (model, prompt set, every ablation mode extracted,
timings) and the invariants checked on every prompt."""

from __future__ import annotations

from typing import Any

import polars as pl

from reports.context import Ctx
from reports.model import Section


def _duration(timings: dict[str, Any]) -> str:
    """Total run time, over every session when the run was resumed."""
    total = timings.get("total_s")
    if total is None:
        return "–"
    n = timings.get("sessions", 1)
    return f"{total:.1f} s" + (f" over {n} sessions (resumed)" if n > 1 else "")


def sections(ctx: Ctx) -> list[Section]:
    m, wh = ctx.manifest, ctx.wh
    model, cfg = m.get("model", {}), m.get("config", {})
    val = ctx.run("validation_summary")
    n_prompts, n_words = wh.sql("SELECT count(*) AS n, count(DISTINCT word) AS w FROM prompts").row(0)
    word_list = wh.sql("SELECT word FROM prompts GROUP BY word ORDER BY min(prompt)")["word"].to_list()
    first_tokens = ", ".join(repr(t) for t in wh.sql(
        "SELECT DISTINCT token_text FROM tokens WHERE position = 0 ORDER BY 1")["token_text"].to_list())
    summary = pl.DataFrame({
        "item": ["model", "layers × heads (KV heads)", "d_model", "dtype", "prompts", "templates", "words",
                 "chat template", "token at position 0", "ablation", "extraction time", "status"],
        "value": [str(model.get("model")),
                  f"{model.get('n_layers')} × {model.get('n_heads')} ({model.get('n_kv_heads')})",
                  str(model.get("d_model")), str(model.get("dtype")),
                  f"{n_prompts} ({n_words} words × {len(ctx.templates)} templates)", " | ".join(ctx.templates),
                  ", ".join(word_list), "on" if cfg.get("chat_template", True) else "off", first_tokens,
                  ctx.ablation.describe(), _duration(m.get("timings", {})), str(m.get("status"))],
    })
    bad = val.filter(pl.col("n_passed") < pl.col("n_prompts"))
    ctx.findings.run.append(
        f"All {len(val)} invariants hold on every prompt (largest relative error {val['max_rel_err'].max():.2g})."
        if bad.height == 0 else f"Validation FAILED: {', '.join(bad['invariant'])}.")
    return [Section("Run summary", "The run's manifest and the invariants checked on every prompt.",
                    tables=[("Run", summary), ("Validation (validation_summary)", val)])]
