-- name: lens_target
-- description: The target token under the logit lens at every layer of every prompt: its
--   probability and rank (the layer x prompt heatmap).
-- param: template_index INTEGER = NULL | only this template (NULL: every template)
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: layer INTEGER | residual after block `layer` (-1 = embeddings)
-- column: target_prob FLOAT | target probability
-- column: target_rank INTEGER | target rank (0 = top-1)
-- column: emergence_layer INTEGER | the prompt's emergence layer (NULL: never top-1 at the end)
SELECT l.prompt, p.word, p.template_index, l.layer, l.target_prob, l.target_rank, e.emergence_layer
FROM logit_lens l
JOIN prompts p ON p.prompt = l.prompt
JOIN emergence e ON e.prompt = l.prompt
WHERE CAST($template_index AS INTEGER) IS NULL OR p.template_index = CAST($template_index AS INTEGER)
ORDER BY l.prompt, l.layer
