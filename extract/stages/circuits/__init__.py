"""Edge attribution (EAP, EAP-IG), circuits and faithfulness (issue 17; the circuits spec).

Public API (what a pipeline stage calls):

- ``pairs.template_pairs`` / ``pairs.word_pairs`` / ``pairs.build`` -> ``PairSet`` (pairs + skipped)
- ``graph.graph_of(arch)`` -> ``Graph`` (nodes, inputs, edges as plain arrays)
- ``scores.score_pairs(adapter, pairs, steps=5)`` -> ``list[PairScores]``
- ``faithfulness.evaluate_circuits(adapter, scores, replacements=..., means=...)`` -> ``list[PairCircuits]``
  (``faithfulness.node_means(adapter, prompts)`` for the ``mean`` replacement)
- ``shard.to_shard(scores, circuits, tolerance)`` -> ``store.circuits_schema.CircuitShard``;
  ``shard.write_shard(writer, shard, n_edges)``, ``shard.write_graph(writer, graph)``

Choices where the spec leaves room (each also in the module that makes it):

- Edge index (ties in circuit selection): row-major over (upstream, downstream), existing edges
  only (EAP-IG's flattened score matrix). Circuit size: Python's ``round`` (half to even), >= 1.
- ``signed`` selection when M(clean) == M(corrupted): sign 0, every key 0, edge-index order.
- IG interpolation written a_clean + (1 - k/m)(a_corr - a_clean): the spec's point, exact at
  k = m (so m = 1 is EAP bit for bit). EAP-IG on activations: the ``input`` group's forwards are
  EAP-IG on inputs' (the same forwards by the spec).
- Answers when the two top-1s agree: rule 'other' (clean top-1 vs the clean run's strongest
  other token); 'top1' otherwise. Metrics in float64 from the logits.
- ``word`` pairs: one per (template, word), one direction; "first token differs" compares the
  token at the clean prompt's ``word_start`` with the partner's. Shards are keyed by the clean
  prompt's index (one template pair per warehouse).
- A circuit built from a metric's scores is evaluated with that metric. The stored f at x = 0
  and x = 1 are computed (0 and 1 up to rounding: the invariants), not set.
- ``mean`` replacement: one vector per node, the mean over the prompts given to ``node_means``
  and all their positions. ``zero`` replacement of every edge into an input leaves it at
  0 + rounding, which an RMSNorm scales by up to 1/sqrt(eps): on models without biases (and
  under sandwich norms) small ``zero`` circuits are rounding-dominated; tests check ``zero``
  on pre-norm families only.
- Exact single-edge effects use the corrupted replacement (``patch``); the sample is per input
  kind: top ``n_top`` by |eap ld score| plus ``n_random`` from numpy's default_rng(seed).
- A sandwich-norm model with an o_proj bias is refused (spec).
"""
