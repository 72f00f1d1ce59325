-- name: compare_emergence
-- description: Emergence layer per model and template at relative depth (comparison): the
--   first layer from which the logit lens keeps the target top-1, divided by the model's
--   n_layers, so models of different depths share one scale (0 = block 0's output; -1/n_layers
--   = already at the embeddings; (n_layers - 1)/n_layers = only at the last block).
-- column: model VARCHAR | the model's label
-- column: template_index INTEGER | template number
-- column: n_layers INTEGER | the model's blocks
-- column: n_prompts BIGINT | prompts with this template
-- column: n_emerged BIGINT | prompts whose final top-1 is the target (emergence layer not NULL)
-- column: mean_layer DOUBLE | mean emergence layer over those
-- column: median_layer DOUBLE | median emergence layer
-- column: mean_rel_depth DOUBLE | mean of emergence layer / n_layers
-- column: median_rel_depth DOUBLE | median of emergence layer / n_layers
-- column: min_rel_depth DOUBLE | earliest relative depth
-- column: max_rel_depth DOUBLE | latest relative depth
WITH e AS (
    SELECT p.model, p.template_index, m.n_layers, e.emergence_layer,
           e.emergence_layer / m.n_layers AS rel_depth
    FROM prompts p
    JOIN emergence e ON e.model = p.model AND e.prompt = p.prompt
    JOIN models m ON m.model = p.model
)
SELECT model, template_index, any_value(n_layers) AS n_layers, count(*) AS n_prompts,
       count(emergence_layer) AS n_emerged,
       avg(emergence_layer) AS mean_layer,
       median(emergence_layer)::DOUBLE AS median_layer,
       avg(rel_depth) AS mean_rel_depth,
       median(rel_depth)::DOUBLE AS median_rel_depth,
       min(rel_depth) AS min_rel_depth,
       max(rel_depth) AS max_rel_depth
FROM e
GROUP BY model, template_index
ORDER BY model, template_index
