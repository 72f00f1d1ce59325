"""Helpers of the circuits and task-vector stage tests: a CLI extraction, a simulated crash,
and every stored dataset of a part of a warehouse."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
from click.testing import CliRunner

from echowh.cli import main


def cli_extract(model: Path, words: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["extract", "--quiet", "--ablation", "none", "--model", str(model),
                                     "--words", str(words), "--out", str(out), *args])


def verify(out: Path):
    return CliRunner().invoke(main, ["verify", "-w", str(out)])


def contents(root: Path, top: str) -> dict[str, object]:
    """Every dataset (raw bytes of its array) and attribute of every file under ``root/top``."""
    out: dict[str, object] = {}
    for p in sorted((root / top).rglob("*.h5")):
        rel = p.relative_to(root).as_posix()
        with h5py.File(p, "r") as f:
            for k, v in f.attrs.items():
                out[f"{rel}@{k}"] = v.tobytes() if isinstance(v, np.ndarray) else v
            for k in f:
                arr = np.asarray(f[k][()])
                out[f"{rel}/{k}"] = (arr.dtype.str, arr.shape, arr.tobytes())
    return out


class Crash(RuntimeError):
    """Raised in place of a killed process, after some jobs were written."""


def crash_after(cls, n_jobs: int, calls: list):
    """A replacement for ``cls.run`` that records every job and raises at job ``n_jobs`` + 1."""
    real = cls.run

    def run(self, job, model, tick):
        calls.append((self.name, job.members, job.todo))
        if n_jobs is not None and len(calls) > n_jobs:
            raise Crash("simulated kill")
        return real(self, job, model, tick)

    return run
