"""Task vectors, function vectors and steering (issue 18; numbers defined in docs/specs/taskvec.md).

Public API (what a pipeline stage calls):

- ``build_set(tok, words, ...) -> PromptSet``: the prompt sets and the train/held-out split
  (``PromptSet.record()`` is a plain dict for the manifest);
- ``build_vectors(ad, ps) -> Vectors``: TV, SV and the head means from train words;
- ``run_rows(ad, ps, words, rows, vec, fv=None, clean_kinds=()) -> {word: WordResult}`` with
  ``plan_aie(L, H)`` or ``plan_interventions(L)``; ``WordResult.arrays()`` is the shard's datasets
  keyed by store.taskvec_schema.TQ fields;
- ``aie_table`` then ``function_vectors(vec, aie) -> FunctionVectors``; ``vector_arrays`` the
  datasets of taskvec/vectors.h5 keyed by store.taskvec_schema.TV fields;
- ``accuracy``, ``baselines``, ``cosines``; ``run_study`` runs every phase in order.
"""

from extract.stages.taskvec.engine import Edit, run_group
from extract.stages.taskvec.interventions import (
    Row,
    WordResult,
    edit_for,
    plan_aie,
    plan_interventions,
    run_rows,
)
from extract.stages.taskvec.prompts import PromptSet, Split, TVPrompt, build_set
from extract.stages.taskvec.study import (
    Accuracy,
    StudyResult,
    accuracy,
    aie_table,
    baselines,
    run_study,
)
from extract.stages.taskvec.vectors import (
    FunctionVectors,
    Vectors,
    build_vectors,
    cosines,
    function_vectors,
    last_states,
    vector_arrays,
)

__all__ = [
    "Accuracy", "Edit", "FunctionVectors", "PromptSet", "Row", "Split", "StudyResult", "TVPrompt", "Vectors",
    "WordResult", "accuracy", "aie_table", "baselines", "build_set", "build_vectors", "cosines", "edit_for",
    "function_vectors", "last_states", "plan_aie", "plan_interventions", "run_group", "run_rows", "run_study",
    "vector_arrays",
]
