"""The run's validation summary: the worst error of each invariant over every stored shard."""

from __future__ import annotations

from typing import Any

from store.schema import ABLATION_DIR, INVARIANTS, PATCHING_DIR, PROMPTS_DIR, A, F
from store.warehouse import WarehouseReader


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
                for row in r.read(fld, i, subdir=subdir):
                    name = row["invariant"].decode()
                    o = seen.setdefault(name, {"max_abs_err": 0.0, "max_rel_err": 0.0, "tolerance": None,
                                               "failed_prompts": [], "passed": True,
                                               "description": INVARIANTS.get(name, "")})
                    o["max_abs_err"] = max(o["max_abs_err"], float(row["max_abs_err"]))
                    o["max_rel_err"] = max(o["max_rel_err"], float(row["rel_err"]))
                    o["tolerance"] = float(row["tolerance"])
                    if not row["passed"]:
                        o["failed_prompts"].append(i)
                        o["passed"] = False
    order = list(INVARIANTS)
    return dict(sorted(seen.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
