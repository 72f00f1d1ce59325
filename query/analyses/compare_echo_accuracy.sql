-- name: compare_echo_accuracy
-- description: Echo accuracy per model and template (comparison): how often the greedy first
--   token is the target, the continuation starts with the word, and is the word alone. The
--   template text is each model's own (a base model may run a few-shot form of template 0).
-- column: model VARCHAR | the model's label
-- column: template_index INTEGER | template number in that warehouse's manifest
-- column: template VARCHAR | the model's template text with {word}
-- column: n_prompts BIGINT | prompts with this template
-- column: n_echo_first_token BIGINT | prompts whose greedy first token is the target token
-- column: first_token_accuracy DOUBLE | n_echo_first_token / n_prompts
-- column: n_echo_correct BIGINT | prompts whose continuation starts with the word (echo_correct)
-- column: echo_accuracy DOUBLE | n_echo_correct / n_prompts
-- column: n_echo_exact BIGINT | prompts whose continuation is just the word (echo_exact)
-- column: exact_accuracy DOUBLE | n_echo_exact / n_prompts
SELECT model,
       template_index,
       any_value(template) AS template,
       count(*) AS n_prompts,
       count(*) FILTER (WHERE echo_first_token) AS n_echo_first_token,
       count(*) FILTER (WHERE echo_first_token) / count(*) AS first_token_accuracy,
       count(*) FILTER (WHERE echo_correct) AS n_echo_correct,
       count(*) FILTER (WHERE echo_correct) / count(*) AS echo_accuracy,
       count(*) FILTER (WHERE echo_exact) AS n_echo_exact,
       count(*) FILTER (WHERE echo_exact) / count(*) AS exact_accuracy
FROM prompts
GROUP BY model, template_index
ORDER BY model, template_index
