-- name: circuit_head_rankings
-- description: Where the circuit's heads sit against the node-level rankings: per attention head,
--   its weight in the circuits (the mean over pairs of a kind of the summed |score| of the edges
--   it sends) and its rank, beside its rank by mean DLA to the target, by mean zero-ablation
--   effect (clean - ablated target logit; NULL without ablation) and by attention on the first
--   token at the last position (the sink ranking; NULL without the sink captures), each over the
--   pairs' clean prompts. Ranks: 1 = largest, ties share the smallest rank. Empty unless extracted
--   with --circuits.
-- param: pair_kind VARCHAR {template,word} = 'word' | which pairs' circuits
-- param: method VARCHAR {eap,eap_ig_inputs,eap_ig_activations} = 'eap_ig_inputs' | attribution method
-- param: metric VARCHAR {ld,kl} = 'ld' | metric
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: circuit_out DOUBLE | mean over pairs of the head's summed outgoing |score|
-- column: circuit_rank BIGINT | rank of circuit_out (1 = largest)
-- column: mean_dla DOUBLE | mean DLA to the target over the clean prompts
-- column: dla_rank BIGINT | rank of mean_dla
-- column: mean_ablation DOUBLE | mean zero-ablation effect over the clean prompts
-- column: ablation_rank BIGINT | rank of mean_ablation
-- column: weight_first DOUBLE | mean attention weight on position 0 at the last position
-- column: sink_rank BIGINT | rank of weight_first
WITH pp AS (
    SELECT clean_prompt FROM circuit_pairs WHERE pair_kind = CAST($pair_kind AS VARCHAR)
),
per_pair AS (
    SELECT clean_prompt, up_layer AS layer, up_head AS head, sum(abs(score::DOUBLE)) AS a
    FROM circuit_edges
    WHERE pair_kind = CAST($pair_kind AS VARCHAR) AND method = CAST($method AS VARCHAR)
      AND metric = CAST($metric AS VARCHAR) AND up_head IS NOT NULL
    GROUP BY clean_prompt, up_layer, up_head
),
c AS (SELECT layer, head, avg(a) AS circuit_out FROM per_pair GROUP BY layer, head),
d AS (
    SELECT layer, head, avg(dla::DOUBLE) AS mean_dla FROM dla JOIN pp ON pp.clean_prompt = dla.prompt
    WHERE component = 'head' GROUP BY layer, head
),
ab AS (
    SELECT layer, head, avg(logit_diff::DOUBLE) AS mean_ablation FROM ablation JOIN pp ON pp.clean_prompt = ablation.prompt
    WHERE unit_kind = 'head' AND mode = 'zero' GROUP BY layer, head
),
sk AS (
    SELECT layer, head, avg(weight_first::DOUBLE) AS weight_first
    FROM first_token_share JOIN pp ON pp.clean_prompt = first_token_share.prompt
    WHERE query_role = 4 GROUP BY layer, head
)
SELECT c.layer, c.head, c.circuit_out, rank() OVER (ORDER BY c.circuit_out DESC) AS circuit_rank,
       d.mean_dla, CASE WHEN d.mean_dla IS NOT NULL THEN rank() OVER (ORDER BY d.mean_dla DESC NULLS LAST) END AS dla_rank,
       ab.mean_ablation,
       CASE WHEN ab.mean_ablation IS NOT NULL THEN rank() OVER (ORDER BY ab.mean_ablation DESC NULLS LAST) END
           AS ablation_rank,
       sk.weight_first,
       CASE WHEN sk.weight_first IS NOT NULL THEN rank() OVER (ORDER BY sk.weight_first DESC NULLS LAST) END
           AS sink_rank
FROM c LEFT JOIN d USING (layer, head) LEFT JOIN ab USING (layer, head) LEFT JOIN sk USING (layer, head)
ORDER BY circuit_rank, c.layer, c.head
