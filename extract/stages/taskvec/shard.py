"""The task-vector study's results -> its shards (store.taskvec_schema's layout), atomically.

What a pipeline stage calls (in this order; each file is complete or absent, so a killed run
resumes by skipping what ``done_words`` lists):

- ``write_word(writer, AIE_SET, result)`` per held-out word, from
  ``run_rows(..., plan_aie(L, H), vec)``  -> ``taskvec/aie/wNNNNN.h5``;
- ``read_word(root, AIE_SET, index, rows)`` the AIE result of a word written by an earlier run
  (``aie_table`` needs every held-out word's), then ``write_vectors(writer, ps, vec, fv, meta)``
  -> ``taskvec/vectors.h5``;
- ``write_word(writer, INTERVENTIONS_SET, result)`` per held-out word, from
  ``run_rows(..., plan_interventions(L), vec, fv, clean_kinds=(Kind.DEMO,))`` with the word's
  shuffled clean reference copied in from its AIE result (``with_shuffled``), as ``run_study`` does.

``write_study(writer, run_study(...), meta)`` writes all three from one finished study (no resume).

Every file carries the warehouse's fingerprint (the writer's manifest) and a ``validation``
array (store.schema.VALIDATION_DTYPE) of the store.taskvec_schema.TV_INVARIANTS it checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from extract.stages.taskvec.interventions import Check, Row, WordResult
from extract.stages.taskvec.prompts import PromptSet
from extract.stages.taskvec.study import StudyResult
from extract.stages.taskvec.vectors import FunctionVectors, Vectors, vector_arrays
from store.shard import ShardWriter
from store.taskvec_schema import (
    AIE_SET,
    INTERVENTIONS_SET,
    TASKVEC_DIR,
    TQ,
    TV,
    VECTORS_FILE,
    Kind,
    Method,
    Where,
    word_shard_name,
)
from store.warehouse import WarehouseWriter, validation_array

SETS = (AIE_SET, INTERVENTIONS_SET)


@dataclass(frozen=True)
class StudyMeta:
    """The settings of a study, stored as vectors.h5's attributes."""

    n_demos: int
    chat: bool
    fv_ks: tuple[int, ...]
    coefficients: tuple[float, ...]


def _writer(writer: WarehouseWriter, final: Path, **stamp) -> ShardWriter:
    final.parent.mkdir(parents=True, exist_ok=True)
    fp = writer.manifest.get("fingerprint")
    return ShardWriter(final, writer.store_dtype, ledger=writer.ledger, staged=writer.staged,
                       stamp={**({"fingerprint": fp} if fp is not None else {}), **stamp})


def word_path(root: Path, subset: str, index: int) -> Path:
    return Path(root) / TASKVEC_DIR / subset / word_shard_name(index)


def done_words(root: Path, subset: str) -> set[int]:
    """Word indices whose ``taskvec/<subset>/`` shard is complete (what a resumed run skips)."""
    folder = Path(root) / TASKVEC_DIR / subset
    return {int(p.stem[1:]) for p in folder.glob("w*.h5") if p.stem[1:].isdigit()}


def has_vectors(root: Path) -> bool:
    return (Path(root) / TASKVEC_DIR / VECTORS_FILE).exists()


def write_word(writer: WarehouseWriter, subset: str, result: WordResult) -> Path:
    """``taskvec/<subset>/wNNNNN.h5`` of one held-out word (NNNNN = its index in the word list)."""
    if subset not in SETS:
        raise ValueError(f"unknown task-vector set {subset!r}: one of {SETS}")
    aie = all(r.method == Method.HEAD_MEAN for r in result.rows)
    if aie != (subset == AIE_SET):
        raise ValueError(f"the {subset} set takes {'only' if subset == AIE_SET else 'no'} HEAD_MEAN rows")
    arrays = result.arrays(writer.store_dtype)
    n = len(result.rows)
    for fld in (TQ.TARGET_PROB, TQ.TARGET_RANK, TQ.ECHO_CORRECT, TQ.KL, TQ.TOP1_ID):
        assert np.shape(arrays[fld]) == (n,), (fld.name, np.shape(arrays[fld]), n)
    final = word_path(writer.root, subset, result.word_index)
    with _writer(writer, final, word_index=result.word_index) as sw:
        for fld, arr in arrays.items():
            sw.put(fld, validation_array(arr) if fld is TQ.VALIDATION else arr)
        sw.attrs({"word": result.word, "set": subset})
    return final


def with_shuffled(result: WordResult, aie: WordResult) -> WordResult:
    """The interventions result of a word with the shuffled prompt's clean reference (from its AIE
    run) added, as run_study does: the shuffled baseline then lives in the interventions shard."""
    assert result.word == aie.word, (result.word, aie.word)
    result.clean[Kind.SHUFFLED] = aie.clean[Kind.SHUFFLED]
    return result


def write_vectors(writer: WarehouseWriter, ps: PromptSet, vec: Vectors, fv: FunctionVectors,
                  meta: StudyMeta) -> Path:
    """``taskvec/vectors.h5``: the split, the train-built vectors, AIE, FV_k and the cosines."""
    arrays = vector_arrays(ps, vec, fv, writer.store_dtype)
    final = Path(writer.root) / TASKVEC_DIR / VECTORS_FILE
    with _writer(writer, final) as sw:
        for fld, arr in arrays.items():
            sw.put(fld, validation_array(arr) if fld is TV.VALIDATION else arr)
        sw.attrs({k: list(v) if isinstance(v, tuple) else v for k, v in asdict(meta).items()})
    return final


def write_study(writer: WarehouseWriter, study: StudyResult, meta: StudyMeta) -> None:
    """Every file of a finished ``run_study`` (no resume): AIE shards, vectors.h5, intervention shards."""
    for w in study.prompts.split.held_out:
        write_word(writer, AIE_SET, study.aie_rows[w])
    write_vectors(writer, study.prompts, study.vectors, study.fv, meta)
    for w in study.prompts.split.held_out:
        write_word(writer, INTERVENTIONS_SET, with_shuffled(study.rows[w], study.aie_rows[w]))


def read_word(root: Path, subset: str, index: int) -> WordResult:
    """A word's shard back as the engine's WordResult (rows, metrics, clean references, checks):
    what a resumed stage feeds to ``aie_table`` for the words an earlier run wrote."""
    with h5py.File(word_path(root, subset, index), "r") as f:
        a = {fld: f[fld.name][()] for fld in vars(TQ).values() if hasattr(fld, "axes")}
        word = f.attrs["word"]
        word = word.decode() if isinstance(word, bytes) else str(word)
    rows = [Row(Method(int(m)), Kind(int(k)), int(layer), Where(int(w)), int(s), int(h), int(k_), float(c))
            for m, k, layer, w, s, h, k_, c in zip(a[TQ.METHOD], a[TQ.KIND], a[TQ.LAYER], a[TQ.WHERE],
                                                   a[TQ.SOURCE], a[TQ.HEAD], a[TQ.K], a[TQ.COEF], strict=True)]
    clean = {Kind(int(k)): (int(t), float(p), int(r), int(top), bool(e)) for k, t, p, r, top, e in zip(
        a[TQ.CLEAN_KIND], a[TQ.CLEAN_TARGET_ID], a[TQ.CLEAN_TARGET_PROB], a[TQ.CLEAN_TARGET_RANK],
        a[TQ.CLEAN_TOP1_ID], a[TQ.CLEAN_ECHO_CORRECT], strict=True)}
    checks = {}
    for v in a[TQ.VALIDATION]:
        name = v["invariant"].decode() if isinstance(v["invariant"], bytes) else str(v["invariant"])
        checks[name] = Check(name, float(v["max_abs_err"]), float(v["rel_err"]))
    return WordResult(word, index, rows, a[TQ.TARGET_PROB], a[TQ.TARGET_RANK], a[TQ.ECHO_CORRECT], a[TQ.KL],
                      a[TQ.TOP1_ID], clean, checks)
