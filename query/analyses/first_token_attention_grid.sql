-- name: first_token_attention_grid
-- description: Attention mass every head puts on position 0 from the last position, averaged
--   over prompts, at every layer (the layer x head attention-sink map).
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_prompts BIGINT | prompts averaged
-- column: mean_mass_first DOUBLE | mean attention weight on position 0
-- column: min_mass_first DOUBLE | smallest over prompts
SELECT layer, head, count(*) AS n_prompts, avg(weight) AS mean_mass_first, min(weight)::DOUBLE AS min_mass_first
FROM attention
WHERE query_role = 4 AND key_pos = 0
GROUP BY layer, head
ORDER BY layer, head
