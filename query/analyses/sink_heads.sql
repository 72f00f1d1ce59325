-- name: sink_heads
-- description: Is the first-token head doing anything? Per layer and head, the attention weight on
--   position 0 beside the share of what the head writes that comes from position 0 (norm-weighted:
--   a_i0 ||v_0 W_O^h|| / sum_j a_ij ||v_j W_O^h||, Kobayashi et al. 2020), averaged over query
--   positions and prompts (or per prompt), with position 0's value-contribution norm against the
--   other positions'. Needs the sink captures (empty for older warehouses).
-- param: query_role INTEGER = 4 | query positions averaged: a role (4 = last, the default) or NULL for every position
-- param: layer INTEGER = NULL | only this block (NULL: every block)
-- param: per_prompt BOOLEAN = false | one row per prompt instead of the mean over prompts
-- column: prompt INTEGER | prompt index (NULL when averaged over prompts)
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_prompts INTEGER | prompts averaged
-- column: weight_first DOUBLE | mean attention weight on position 0
-- column: norm_share_first DOUBLE | mean share of the head's output norm that comes from position 0
-- column: value_out_norm_first DOUBLE | mean ||v_0 W_O^h||: what the head writes per unit of attention on position 0
-- column: value_out_norm_other DOUBLE | the same, mean over the other positions
WITH fs AS (
    SELECT prompt, layer, head, avg(weight_first) AS w, avg(norm_share_first) AS s
    FROM first_token_share
    WHERE query_role BETWEEN coalesce(CAST($query_role AS INTEGER), -1) AND coalesce(CAST($query_role AS INTEGER), 1000)
      AND layer BETWEEN coalesce(CAST($layer AS INTEGER), 0) AND coalesce(CAST($layer AS INTEGER), 1000000)
    GROUP BY prompt, layer, head
),
nm AS (
    SELECT prompt, layer, head,
           avg(value_out_norm) FILTER (WHERE position = 0) AS n0,
           avg(value_out_norm) FILTER (WHERE position > 0) AS n1
    FROM head_norms
    WHERE layer BETWEEN coalesce(CAST($layer AS INTEGER), 0) AND coalesce(CAST($layer AS INTEGER), 1000000)
    GROUP BY prompt, layer, head
)
SELECT CASE WHEN $per_prompt THEN fs.prompt END::INTEGER AS prompt, fs.layer, fs.head,
       count(*)::INTEGER AS n_prompts, avg(fs.w)::DOUBLE AS weight_first,
       avg(fs.s)::DOUBLE AS norm_share_first, avg(nm.n0)::DOUBLE AS value_out_norm_first,
       avg(nm.n1)::DOUBLE AS value_out_norm_other
FROM fs JOIN nm USING (prompt, layer, head)
GROUP BY 1, fs.layer, fs.head
ORDER BY 1 NULLS FIRST, fs.layer, fs.head
