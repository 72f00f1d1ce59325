-- name: echo_behaviour
-- description: Greedy continuation and echo accuracy per template: how often the model's
--   first generated token is the target, how often the continuation starts with the word, and
--   how often it is the word and nothing else.
-- column: template_index INTEGER | template number in the manifest
-- column: template VARCHAR | template text with {word}
-- column: n_prompts BIGINT | prompts with this template
-- column: n_echo_first_token BIGINT | prompts whose greedy first token is the target token
-- column: first_token_accuracy DOUBLE | n_echo_first_token / n_prompts
-- column: n_echo_correct BIGINT | prompts whose continuation starts with the word (echo_correct)
-- column: echo_accuracy DOUBLE | n_echo_correct / n_prompts
-- column: n_echo_exact BIGINT | prompts whose continuation is just the word (echo_exact)
-- column: exact_accuracy DOUBLE | n_echo_exact / n_prompts
SELECT template_index,
       any_value(template) AS template,
       count(*) AS n_prompts,
       count(*) FILTER (WHERE echo_first_token) AS n_echo_first_token,
       count(*) FILTER (WHERE echo_first_token) / count(*) AS first_token_accuracy,
       count(*) FILTER (WHERE echo_correct) AS n_echo_correct,
       count(*) FILTER (WHERE echo_correct) / count(*) AS echo_accuracy,
       count(*) FILTER (WHERE echo_exact) AS n_echo_exact,
       count(*) FILTER (WHERE echo_exact) / count(*) AS exact_accuracy
FROM prompts
GROUP BY template_index
ORDER BY template_index
