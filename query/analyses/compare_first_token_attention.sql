-- name: compare_first_token_attention
-- description: Each model's first-token attention map at relative depth (comparison): the
--   attention every head puts on position 0 from the last position, averaged over prompts,
--   with its block's relative depth layer / n_layers so maps of different depths line up.
-- column: model VARCHAR | the model's label
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_layers INTEGER | the model's blocks
-- column: rel_depth DOUBLE | layer / n_layers
-- column: n_prompts BIGINT | prompts averaged
-- column: mean_mass_first DOUBLE | mean attention weight on position 0
-- column: min_mass_first DOUBLE | smallest over prompts
WITH h AS (
    SELECT model, layer, head, count(*) AS n_prompts, avg(weight) AS mean_mass_first,
           min(weight)::DOUBLE AS min_mass_first
    FROM attention
    WHERE query_role = 4 AND key_pos = 0
    GROUP BY model, layer, head
)
SELECT h.model, h.layer, h.head, m.n_layers, h.layer / m.n_layers AS rel_depth,
       h.n_prompts, h.mean_mass_first, h.min_mass_first
FROM h JOIN models m ON m.model = h.model
ORDER BY h.model, h.layer, h.head
