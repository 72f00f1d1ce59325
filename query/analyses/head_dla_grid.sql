-- name: head_dla_grid
-- description: Direct logit attribution of every head at every layer, averaged over prompts
--   (the layer x head DLA heatmap).
-- param: template_index INTEGER = NULL | only this template (NULL: every template)
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: n_prompts BIGINT | prompts averaged
-- column: mean_dla DOUBLE | mean DLA to each prompt's target
-- column: mean_abs_dla DOUBLE | mean |DLA|
SELECT d.layer, d.head, count(*) AS n_prompts, avg(d.dla) AS mean_dla, avg(abs(d.dla)) AS mean_abs_dla
FROM dla d
JOIN prompts p ON p.prompt = d.prompt
WHERE d.component = 'head'
  AND (CAST($template_index AS INTEGER) IS NULL OR p.template_index = CAST($template_index AS INTEGER))
GROUP BY d.layer, d.head
ORDER BY d.layer, d.head
