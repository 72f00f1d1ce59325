-- name: sink_norms
-- description: The first token's key, value and query norms against the other positions', per layer
--   (mean over heads, positions and prompts; keys and values of each head's KV group). Gu et al. 2025
--   report small keys and values on the sink.
-- column: layer INTEGER | block index
-- column: key_norm_first DOUBLE | mean ||k_0||
-- column: key_norm_other DOUBLE | mean ||k_j||, j > 0
-- column: value_norm_first DOUBLE | mean ||v_0||
-- column: value_norm_other DOUBLE | mean ||v_j||, j > 0
-- column: value_out_norm_first DOUBLE | mean ||v_0 W_O^h||
-- column: value_out_norm_other DOUBLE | mean ||v_j W_O^h||, j > 0
-- column: query_norm_first DOUBLE | mean ||q_0||
-- column: query_norm_other DOUBLE | mean ||q_j||, j > 0
-- column: value_out_ratio DOUBLE | value_out_norm_first / value_out_norm_other
SELECT layer,
       avg(key_norm) FILTER (WHERE position = 0)::DOUBLE AS key_norm_first,
       avg(key_norm) FILTER (WHERE position > 0)::DOUBLE AS key_norm_other,
       avg(value_norm) FILTER (WHERE position = 0)::DOUBLE AS value_norm_first,
       avg(value_norm) FILTER (WHERE position > 0)::DOUBLE AS value_norm_other,
       avg(value_out_norm) FILTER (WHERE position = 0)::DOUBLE AS value_out_norm_first,
       avg(value_out_norm) FILTER (WHERE position > 0)::DOUBLE AS value_out_norm_other,
       avg(query_norm) FILTER (WHERE position = 0)::DOUBLE AS query_norm_first,
       avg(query_norm) FILTER (WHERE position > 0)::DOUBLE AS query_norm_other,
       (avg(value_out_norm) FILTER (WHERE position = 0) / avg(value_out_norm) FILTER (WHERE position > 0))::DOUBLE
           AS value_out_ratio
FROM head_norms GROUP BY layer ORDER BY layer
