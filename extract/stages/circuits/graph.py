"""The computational graph of edge attribution as plain data (EAP-IG's graph.py, with GQA).

Upstream nodes (senders), in forward order: ``input`` (the embedding output), then per layer l
the heads ``a{l}.h{h}`` and the MLP ``m{l}``. Downstream inputs (receivers): per layer l the
query of every head ``a{l}.h{h}<q>``, the key and the value of every KV head ``a{l}.h{g}<k>`` /
``<v>``, the MLP input ``m{l}``; finally ``logits``. An edge u -> d exists iff u comes before d
in the forward order input < a0.* < m0 < a1.* < ... < m{L-1} < logits (heads feed their own
layer's MLP, never their own layer's q/k/v).

Edge index (what ties between equal scores are broken by): row-major over (upstream,
downstream) in the orders above, existing edges only -- EAP-IG's flattened (n_forward,
n_backward) score matrix with the absent entries dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import cached_property

import numpy as np


class InputKind(enum.IntEnum):
    """What a downstream input feeds (the edge kinds of the rank correlations)."""

    Q = 0
    K = 1
    V = 2
    MLP = 3
    LOGITS = 4


@dataclass(frozen=True)
class Graph:
    """Nodes, inputs and edges of one model shape; every array is indexed as documented."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    # -- upstream nodes: index 0 = input, then per layer H heads and the MLP -------------------

    @property
    def n_up(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    def up_head(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def up_mlp(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    @cached_property
    def up_names(self) -> tuple[str, ...]:
        out = ["input"]
        for lay in range(self.n_layers):
            out += [f"a{lay}.h{h}" for h in range(self.n_heads)] + [f"m{lay}"]
        return tuple(out)

    @cached_property
    def up_layer(self) -> np.ndarray:
        """(U,) int: layer of each upstream node, -1 for input."""
        return np.array([-1] + [lay for lay in range(self.n_layers) for _ in range(self.n_heads + 1)], np.int16)

    @cached_property
    def up_head_index(self) -> np.ndarray:
        """(U,) int: head of each upstream node, -1 for input and MLPs."""
        per = list(range(self.n_heads)) + [-1]
        return np.array([-1] + per * self.n_layers, np.int16)

    @cached_property
    def up_stage(self) -> np.ndarray:
        """(U,) int: forward position; input 0, layer l's heads 2l+1, its MLP 2l+2."""
        per = [1] * self.n_heads + [2]
        return np.array([0] + [2 * lay + s for lay in range(self.n_layers) for s in per], np.int32)

    # -- downstream inputs: per layer H q, KV k, KV v, the MLP; then logits -------------------

    @property
    def n_attn_inputs(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads

    @property
    def per_layer_down(self) -> int:
        return self.n_attn_inputs + 1

    @property
    def n_down(self) -> int:
        return self.n_layers * self.per_layer_down + 1

    def down_attn(self, layer: int) -> slice:
        """The layer's q (H), k (KV), v (KV) inputs, in that order."""
        s = layer * self.per_layer_down
        return slice(s, s + self.n_attn_inputs)

    def down_mlp(self, layer: int) -> int:
        return layer * self.per_layer_down + self.n_attn_inputs

    @property
    def down_logits(self) -> int:
        return self.n_down - 1

    @cached_property
    def _down_table(self) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        H, KV = self.n_heads, self.n_kv_heads
        names, kind, layer, head, stage = [], [], [], [], []
        for lay in range(self.n_layers):
            for k, n, tag in ((InputKind.Q, H, "q"), (InputKind.K, KV, "k"), (InputKind.V, KV, "v")):
                for h in range(n):
                    names.append(f"a{lay}.h{h}<{tag}>")
                    kind.append(k), layer.append(lay), head.append(h), stage.append(2 * lay + 1)
            names.append(f"m{lay}")
            kind.append(InputKind.MLP), layer.append(lay), head.append(-1), stage.append(2 * lay + 2)
        names.append("logits")
        kind.append(InputKind.LOGITS), layer.append(self.n_layers), head.append(-1)
        stage.append(2 * self.n_layers + 1)
        return (tuple(names), np.array(kind, np.int8), np.array(layer, np.int16), np.array(head, np.int16),
                np.array(stage, np.int32))

    @property
    def down_names(self) -> tuple[str, ...]:
        return self._down_table[0]

    @property
    def down_kind(self) -> np.ndarray:
        """(Dn,) InputKind of each downstream input."""
        return self._down_table[1]

    @property
    def down_layer(self) -> np.ndarray:
        """(Dn,) layer read (logits: L)."""
        return self._down_table[2]

    @property
    def down_head(self) -> np.ndarray:
        """(Dn,) query head, or KV head for k/v inputs, -1 for MLP and logits."""
        return self._down_table[3]

    @property
    def down_stage(self) -> np.ndarray:
        """(Dn,) forward position of the reading node: layer l's attention 2l+1, its MLP 2l+2."""
        return self._down_table[4]

    # -- edges ----------------------------------------------------------------------------------

    @cached_property
    def exists(self) -> np.ndarray:
        """(U, Dn) bool: the edge u -> d exists (u strictly before d in the forward order)."""
        return self.up_stage[:, None] < self.down_stage[None, :]

    @cached_property
    def edge_up(self) -> np.ndarray:
        """(E,) upstream index of each edge, in edge-index order (row-major over (u, d))."""
        return np.nonzero(self.exists)[0].astype(np.int32)

    @cached_property
    def edge_down(self) -> np.ndarray:
        """(E,) downstream index of each edge."""
        return np.nonzero(self.exists)[1].astype(np.int32)

    @property
    def n_edges(self) -> int:
        return int(self.edge_up.shape[0])

    @property
    def edge_kind(self) -> np.ndarray:
        """(E,) InputKind of each edge's downstream input."""
        return self.down_kind[self.edge_down]

    def expected_edges(self) -> int:
        """The spec's closed form: sum_l [(H+2KV)(1+l(H+1)) + (1+l(H+1)+H)] + (1+L(H+1))."""
        L, H, KV = self.n_layers, self.n_heads, self.n_kv_heads
        return sum((H + 2 * KV) * (1 + lay * (H + 1)) + (1 + lay * (H + 1) + H) for lay in range(L)) + 1 + L * (H + 1)

    def matrix(self, edge_values: np.ndarray) -> np.ndarray:
        """(E,) per-edge values -> (U, Dn) matrix, 0 where no edge."""
        out = np.zeros(self.exists.shape, dtype=edge_values.dtype)
        out[self.edge_up, self.edge_down] = edge_values
        return out


def graph_of(arch) -> Graph:
    """The graph of a model shape (an ``extract.models.families.Arch``)."""
    return Graph(arch.n_layers, arch.n_heads, arch.n_kv_heads)
