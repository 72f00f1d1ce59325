-- name: emergence_counts
-- description: How many prompts have each emergence layer, per template (NULL layer: the
--   target never ends top-1).
-- column: template_index INTEGER | template number
-- column: emergence_layer INTEGER | emergence layer (NULL: never)
-- column: n_prompts BIGINT | prompts with this template and emergence layer
SELECT p.template_index, e.emergence_layer, count(*) AS n_prompts
FROM prompts p
JOIN emergence e ON e.prompt = p.prompt
GROUP BY p.template_index, e.emergence_layer
ORDER BY p.template_index, e.emergence_layer NULLS LAST
