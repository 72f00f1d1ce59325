-- name: compare_emergence_prompts
-- description: Every prompt's emergence layer with the model's depth (comparison): one row
--   per model and prompt, relative depth = emergence layer / n_layers (NULL: the final top-1
--   is not the target).
-- column: model VARCHAR | the model's label
-- column: prompt INTEGER | prompt index in that warehouse
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: n_layers INTEGER | the model's blocks
-- column: emergence_layer INTEGER | first layer from which the target stays rank 0 (NULL: never)
-- column: rel_depth DOUBLE | emergence_layer / n_layers
-- column: echo_correct BOOLEAN | the continuation starts with the word
SELECT p.model, p.prompt, p.word, p.template_index, m.n_layers, e.emergence_layer,
       e.emergence_layer / m.n_layers AS rel_depth, p.echo_correct
FROM prompts p
JOIN emergence e ON e.model = p.model AND e.prompt = p.prompt
JOIN models m ON m.model = p.model
ORDER BY p.model, p.prompt
