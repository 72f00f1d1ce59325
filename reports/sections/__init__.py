"""The study report's sections, in page order: the one list a new section is registered in.

Each entry is a function ``sections(ctx: Ctx) -> list[Section]`` from its own module here; it
runs its named analyses through ``ctx.run`` and writes its findings to ``ctx.findings`` under
the question they answer (``headline`` for the one sentence that answers it, ``add`` for the
rest). Charts a section alone draws are defined in its module.
"""

from __future__ import annotations

from collections.abc import Callable

from reports.context import Ctx
from reports.model import Section
from reports.sections import (
    circuits,
    cosine,
    echo,
    emergence,
    heads,
    patching,
    sinks,
    summary,
    taskvec,
)

SectionFn = Callable[[Ctx], list[Section]]

SECTIONS: tuple[SectionFn, ...] = (
    summary.sections,    # Run summary
    echo.sections,       # Echo behaviour                          (does the model echo?)
    emergence.sections,  # Emergence layer, Logit lens             (where does the answer appear?)
    heads.sections,      # DLA, DLA vs ablation, consistency, ...  (which heads matter, by which measure?)
    sinks.sections,      # Attention to the first token, sinks     (is position 0 a sink?)
    cosine.sections,     # Residual cosine similarity
    patching.sections,   # What makes the templates differ         (what makes the templates differ?)
    circuits.sections,   # Which paths carry the word              (which paths carry the word?)
    taskvec.sections,    # Is there one 'repeat' inside the model? (task vectors; only with --task-vectors)
)
