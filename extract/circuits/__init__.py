"""Edge attribution (EAP, EAP-IG), circuits and faithfulness (issue 17; the circuits spec).

Public API (what a pipeline stage calls):

- ``pairs.template_pairs`` / ``pairs.word_pairs`` / ``pairs.build`` -> ``PairSet`` (pairs + skipped)
- ``graph.graph_of(arch)`` -> ``Graph`` (nodes, inputs, edges as plain arrays)
- ``scores.score_pairs(adapter, pairs, steps=5)`` -> ``list[PairScores]``
- ``faithfulness.evaluate_circuits(adapter, scores, replacements=..., means=...)`` -> ``list[PairCircuits]``
  (``faithfulness.node_means(adapter, prompts)`` for the ``mean`` replacement)
- ``shard.to_shard(scores, circuits, tolerance)`` -> ``store.circuits_schema.CircuitShard``;
  ``shard.write_shard(writer, shard, n_edges)``, ``shard.write_graph(writer, graph)``
"""
