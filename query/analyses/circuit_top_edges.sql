-- name: circuit_top_edges
-- description: The edges that carry the pair's difference: per pair kind (template, word), each
--   edge's score averaged over the pairs of that kind (words, template directions), the top edges
--   by |mean score|. Empty unless extracted with --circuits.
-- param: method VARCHAR {eap,eap_ig_inputs,eap_ig_activations} = 'eap_ig_inputs' | attribution method
-- param: metric VARCHAR {ld,kl} = 'ld' | metric the scores are gradients of
-- param: top INTEGER = 20 | edges kept per pair kind
-- column: pair_kind VARCHAR | 'template' or 'word'
-- column: edge INTEGER | edge index
-- column: upstream VARCHAR | sender node
-- column: downstream VARCHAR | receiver input
-- column: input_kind VARCHAR | q, k, v, mlp or logits
-- column: up_layer INTEGER | sender's layer (-1: input)
-- column: up_head INTEGER | sender's head (NULL: input, MLP)
-- column: down_layer INTEGER | receiver's layer (logits: L)
-- column: down_head INTEGER | receiver's query head (q) or KV head (k, v); NULL otherwise
-- column: n_pairs BIGINT | pairs averaged
-- column: mean_score DOUBLE | mean score over the pairs (estimated change of M when the edge is corrupted)
-- column: mean_abs_score DOUBLE | mean |score| over the pairs
-- column: edge_rank BIGINT | rank by |mean_score| within the pair kind (1 = largest; ties by edge index)
WITH m AS (
    SELECT pair_kind, edge, any_value(upstream) AS upstream, any_value(downstream) AS downstream,
           any_value(input_kind) AS input_kind, any_value(up_layer) AS up_layer,
           any_value(up_head) AS up_head, any_value(down_layer) AS down_layer, any_value(down_head) AS down_head, count(*) AS n_pairs, avg(score::DOUBLE) AS mean_score,
           avg(abs(score::DOUBLE)) AS mean_abs_score
    FROM circuit_edges
    WHERE method = CAST($method AS VARCHAR) AND metric = CAST($metric AS VARCHAR)
    GROUP BY pair_kind, edge
),
r AS (SELECT *, row_number() OVER (PARTITION BY pair_kind ORDER BY abs(mean_score) DESC, edge) AS edge_rank FROM m)
SELECT pair_kind, edge, upstream, downstream, input_kind, up_layer, up_head, down_layer, down_head, n_pairs, mean_score,
       mean_abs_score, edge_rank
FROM r WHERE edge_rank <= CAST($top AS INTEGER)
ORDER BY pair_kind, edge_rank
