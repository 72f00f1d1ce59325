"""The run's validation summary: the worst error of each invariant over every stored shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from store.circuits_schema import CIRCUIT_INVARIANTS, CIRCUITS_DIR
from store.schema import ABLATION_DIR, INVARIANTS, PATCHING_DIR, PROMPTS_DIR, A, F
from store.taskvec_schema import TASKVEC_DIR, TV_INVARIANTS
from store.warehouse import WarehouseReader

DESCRIPTIONS = {**INVARIANTS, **CIRCUIT_INVARIANTS, **TV_INVARIANTS}


def stage_files(root: Path) -> list[tuple[Path, int]]:
    """(file, index) of every circuits and task-vector file with a validation array (index: the
    clean prompt, the word, or -1 for taskvec/vectors.h5)."""
    out: list[tuple[Path, int]] = []
    for top in (Path(root) / CIRCUITS_DIR, Path(root) / TASKVEC_DIR):
        for p in sorted(top.rglob("*.h5")) if top.is_dir() else []:
            stem = p.stem[1:]
            if p.name[0] in "pw" and stem.isdigit():
                out.append((p, int(stem)))
            elif p.parent.name == TASKVEC_DIR:
                out.append((p, -1))
    return out


def summarise_validation(root) -> dict[str, dict[str, Any]]:
    """Max error of each invariant over every stored shard (prompts and ablation), and which
    prompts failed; only the invariants this run checked appear, in INVARIANTS order."""
    seen: dict[str, dict[str, Any]] = {}
    with WarehouseReader(root) as r:
        folders = [(PROMPTS_DIR, r.prompt_indices()), (ABLATION_DIR, r.ablation_indices())]
        patching = r.root / PATCHING_DIR
        if patching.is_dir():  # patching/<a>-<b>/: same validation dtype (store.schema.PT)
            folders += [(f"{PATCHING_DIR}/{d.name}", r.prompt_indices(f"{PATCHING_DIR}/{d.name}"))
                        for d in sorted(patching.iterdir()) if d.is_dir()]
        for subdir, indices in folders:
            for i in indices:
                fld = F.VALIDATION if subdir == PROMPTS_DIR else A.VALIDATION
                if not r.has(fld, i, subdir):
                    continue  # an ablation shard of a run without the engine check
                _add(seen, r.read(fld, i, subdir=subdir), i)
        for path, i in stage_files(r.root):  # circuits/, taskvec/: the same validation dtype
            with h5py.File(path, "r", locking=False) as f:
                _add(seen, f["validation"][()], i)
    order = list(DESCRIPTIONS)
    return dict(sorted(seen.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _add(seen: dict[str, dict[str, Any]], rows, index: int) -> None:
    """Fold one shard's validation rows into the summary (``index`` names a failing shard)."""
    for row in rows:
        name = row["invariant"].decode()
        o = seen.setdefault(name, {"max_abs_err": 0.0, "max_rel_err": 0.0, "tolerance": None,
                                   "failed_prompts": [], "passed": True, "description": DESCRIPTIONS.get(name, "")})
        o["max_abs_err"] = max(o["max_abs_err"], float(row["max_abs_err"]))
        o["max_rel_err"] = max(o["max_rel_err"], float(row["rel_err"]))
        o["tolerance"] = float(row["tolerance"])
        if not row["passed"]:
            o["failed_prompts"].append(index)
            o["passed"] = False
