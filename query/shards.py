"""Read access to a warehouse's shards for the views: sizes, token roles and text, counted
reads, and one place where a broken shard becomes a one-line :class:`QueryError`."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import PurePath
from typing import Any

import h5py
import numpy as np

from query.errors import QueryError
from store import F, M, Role, WarehouseError, WarehouseReader
from store.schema import MODEL_FILE, PROMPTS_DIR, prompt_shard_name


def shard_error(e: BaseException, where: str) -> QueryError:
    """A one-line error naming the file; a store error already names it."""
    if isinstance(e, QueryError):
        return e
    if isinstance(e, WarehouseError):
        return QueryError(str(e).splitlines()[0] if str(e) else where)
    detail = " ".join(str(e).split()) or type(e).__name__
    return QueryError(f"{where}: unreadable shard ({type(e).__name__}: {detail})")


def model_label(manifest: Mapping[str, Any]) -> str:
    """A warehouse's default model label: the ``--model`` it was extracted with, a local
    folder by its last path component (``/tmp/x/tiny-qwen2`` -> ``tiny-qwen2``)."""
    model = manifest.get("model") if isinstance(manifest.get("model"), Mapping) else {}
    name = str(model.get("model") or model.get("id") or "model")
    if str(model.get("source", "")).startswith("folder:"):
        name = PurePath(name.rstrip("/\\")).name or name
    return name


class Shards:
    """The warehouse's sizes and per-prompt helpers; files are opened read-only by the reader.

    ``label``: the model's name in the ``models`` view (default :func:`model_label`).
    """

    def __init__(self, reader: WarehouseReader, label: str | None = None) -> None:
        self.r = reader
        self.label = label if label is not None else model_label(reader.manifest)
        with self.reading():
            attrs = reader.model_attrs()
            self.model_attrs = attrs
            self.n_layers = int(attrs["n_layers"])
            self.n_heads = int(attrs["n_heads"])
            self.d_model = int(attrs["d_model"])
        self.prompts = np.array(reader.prompt_indices(), dtype=np.int64)
        self.bytes_read = 0  # heavy-view bytes read from HDF5, as stored on disk
        self._count_lock = threading.Lock()  # DuckDB may scan two views from two threads
        self._vocab: np.ndarray | None = None
        self._roles: dict[int, np.ndarray] = {}

    def path(self, p: int | None, subdir: str = PROMPTS_DIR) -> str:
        """The file a read is from (``None``: the model file)."""
        if p is None:
            return str(self.r.root / MODEL_FILE)
        return str(self.r.root / subdir / prompt_shard_name(p))

    @contextmanager
    def reading(self, p: int | None = None, subdir: str = PROMPTS_DIR) -> Iterator[None]:
        """Turn any failure to read prompt ``p``'s shard (or the model file) into a QueryError."""
        try:
            yield
        except (WarehouseError, OSError, KeyError, ValueError, TypeError, IndexError) as e:
            raise shard_error(e, self.path(p, subdir)) from None

    # -- per-prompt helpers ------------------------------------------------------------------
    def vocab(self) -> np.ndarray:
        if self._vocab is None:
            with self.reading():
                try:
                    self._vocab = self.r.read_model(M.VOCAB_TEXT)
                except KeyError:
                    self._vocab = np.array([], dtype=object)
        return self._vocab

    def text(self, ids: Any) -> list[str | None]:
        v = self.vocab()
        return [v[i] if 0 <= i < len(v) else None for i in np.asarray(ids).tolist()]

    def roles(self, p: int) -> np.ndarray:
        """Role of each token position of prompt ``p`` (T,) int8."""
        if p not in self._roles:
            with self.reading(p):
                self._roles[p] = self.r.read(F.POSITION_ROLE, p).astype(np.int8)
        return self._roles[p]

    def word_span(self, p: int, attrs: Mapping[str, Any] | None = None) -> tuple[int, int]:
        """The word's token positions [start, end): stored by the extraction, else its WORD roles."""
        with self.reading(p):
            a = self.r.prompt_attrs(p) if attrs is None else attrs
        if a.get("word_start") is not None and a.get("word_end") is not None:
            return int(a["word_start"]), int(a["word_end"])
        pos = np.flatnonzero(self.roles(p) == Role.WORD)
        return (int(pos[0]), int(pos[-1]) + 1) if pos.size else (0, 0)

    def read_counted(self, ds: h5py.Dataset, sel: tuple) -> np.ndarray:
        """``ds[sel]`` as float32, adding the bytes it occupies on disk to ``bytes_read``."""
        out = np.asarray(ds.astype("float32")[sel])
        with self._count_lock:
            self.bytes_read += out.size * ds.dtype.itemsize
        return out
