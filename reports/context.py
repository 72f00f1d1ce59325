"""The one object every section of the study report is a function of: :class:`Ctx`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from query import Warehouse
from reports.model import Findings

UNIT_MODES = ("zero", "mean")  # modes that remove a unit (head, attention or MLP block)
MODE_MEANING = {
    "zero": "each head, attention block and MLP block replaced by zeros",
    "mean": "each unit replaced by its mean over the template's prompts",
    "sink": "each head's attention to position 0 removed, weights renormalised",
    "sink_norenorm": "each head's value contribution from position 0 removed",
}


@dataclass
class Ablation:
    """What the warehouse's ablation shards hold (empty ``modes``: no ablation data)."""

    modes: list[str]  # every mode extracted: zero, mean, sink, sink_norenorm, then any other
    positions: list[str]  # 'all' and/or 'last'
    layers: list[int]

    @property
    def unit_modes(self) -> list[str]:
        """The unit-removal modes (zero, mean), which the head and block sections show."""
        return [m for m in self.modes if m in UNIT_MODES]

    @property
    def mode(self) -> str:
        """The mode the head-level sections show: zero when there, else mean."""
        assert self.unit_modes, "no unit-removal ablation in this warehouse"
        return self.unit_modes[0]

    def describe(self) -> str:
        """Every mode extracted, where and on which layers, e.g. 'zero, sink and sink_norenorm
        ablation at the last position only, layers 0-3 (zero: ...; sink: ...)'."""
        if not self.modes:
            return "none"
        names = self.modes[0] if len(self.modes) == 1 else f"{', '.join(self.modes[:-1])} and {self.modes[-1]}"
        where = " and ".join("all positions" if p == "all" else "the last position only" for p in self.positions)
        meaning = "; ".join(f"{m}: {MODE_MEANING.get(m, 'see the ablation view')}" for m in self.modes)
        return f"{names} ablation at {where}, layers {layer_ranges(self.layers)} ({meaning})"


def ablation_info(wh: Warehouse) -> Ablation:
    """The modes, positions and layers of the ablation view (the data, not the request)."""
    rows = wh.sql("SELECT DISTINCT mode, positions FROM ablation").rows()
    order = {m: i for i, m in enumerate(MODE_MEANING)}
    modes = sorted({m for m, _ in rows}, key=lambda m: (order.get(m, len(order)), m))
    positions = sorted({p for _, p in rows})
    layers = wh.sql("SELECT DISTINCT layer FROM ablation ORDER BY layer")["layer"].to_list() if rows else []
    return Ablation(modes, positions, layers)


def layer_ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out: list[str] = []
    for x in layers:
        if out and x == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{x}"
        else:
            out.append(str(x))
    return ", ".join(out)


def most_common_emergence_layer(counts: pl.DataFrame) -> tuple[int, int] | None:
    """(layer, prompts) where the target most often emerges over all templates, from
    emergence_counts (None: it never does). Shared by the emergence and head sections."""
    c = (counts.drop_nulls("emergence_layer").group_by("emergence_layer").agg(pl.col("n_prompts").sum())
         .sort(["n_prompts", "emergence_layer"], descending=[True, False]))
    return (int(c["emergence_layer"][0]), int(c["n_prompts"][0])) if c.height else None


@dataclass
class Ctx:
    """What every section reads (the warehouse, its manifest, the words asked for, what its
    ablation holds) and where it writes its findings (``ctx.findings``)."""

    wh: Warehouse
    manifest: dict[str, Any]
    words: tuple[str, ...]
    ablation: Ablation
    findings: Findings = field(default_factory=Findings)

    @classmethod
    def open(cls, wh: Warehouse, words: tuple[str, ...]) -> Ctx:
        manifest = {k: json.loads(v) for k, v in wh.sql("SELECT key, value FROM manifest").rows()}
        return cls(wh, manifest, tuple(words), ablation_info(wh))

    @property
    def templates(self) -> list[str]:
        return self.manifest.get("templates", [])

    def template_name(self, i: int) -> str:
        return f"“{self.templates[i]}”" if i < len(self.templates) else f"template {i}"

    def run(self, name: str, **params: Any) -> pl.DataFrame:
        """A named analysis (query/analyses/NAME.sql) on this warehouse."""
        return self.wh.run_analysis(name, **params)
