-- name: first_token_attention
-- description: Attention of each head from the last position: the mass on position 0 (the
--   attention-sink candidate), the mass on each token role, and the position (other than 0)
--   that gets the most of the rest. Default block: each prompt's emergence layer.
-- param: layer INTEGER = NULL | block index; NULL = each prompt's emergence layer (prompts with no emergence block, NULL or -1, are left out: give a layer to include every prompt)
-- param: head INTEGER = NULL | only this head (NULL: every head)
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: mass_first DOUBLE | attention weight on position 0
-- column: mass_template DOUBLE | total weight on template tokens (role 1)
-- column: mass_word DOUBLE | total weight on the word's tokens (its span: includes the last position when the word ends the prompt, as in raw prompts)
-- column: mass_suffix DOUBLE | total weight on tokens after the word (role 3)
-- column: mass_last DOUBLE | weight on the last position itself (role 4)
-- column: top_other_pos INTEGER | the position other than 0 with the largest weight
-- column: top_other_weight FLOAT | its weight
-- column: top_other_token VARCHAR | its token text
-- column: top_other_role VARCHAR | its role name
WITH sel AS (
    SELECT p.prompt, p.word, p.template_index, p.word_start, p.word_end,
           coalesce(CAST($layer AS INTEGER), e.emergence_layer) AS layer
    FROM prompts p JOIN emergence e ON e.prompt = p.prompt
),
att AS (
    -- the BETWEEN bounds let a given layer/head narrow what is read from disk
    SELECT a.prompt, a.layer, a.head, a.key_pos, a.key_role, a.weight,
           a.key_pos >= s.word_start AND a.key_pos < s.word_end AS in_word
    FROM attention a
    JOIN sel s ON s.prompt = a.prompt AND s.layer = a.layer
    WHERE a.query_role = 4
      AND a.layer BETWEEN coalesce(CAST($layer AS INTEGER), -1) AND coalesce(CAST($layer AS INTEGER), 1000000)
      AND a.head BETWEEN coalesce(CAST($head AS INTEGER), 0) AND coalesce(CAST($head AS INTEGER), 1000000)
),
agg AS (
    SELECT prompt, layer, head,
           coalesce(sum(weight) FILTER (WHERE key_pos = 0), 0)::DOUBLE AS mass_first,
           coalesce(sum(weight) FILTER (WHERE key_role = 1), 0)::DOUBLE AS mass_template,
           coalesce(sum(weight) FILTER (WHERE in_word), 0)::DOUBLE AS mass_word,
           coalesce(sum(weight) FILTER (WHERE key_role = 3), 0)::DOUBLE AS mass_suffix,
           coalesce(sum(weight) FILTER (WHERE key_role = 4), 0)::DOUBLE AS mass_last,
           arg_max(key_pos, weight) FILTER (WHERE key_pos > 0) AS top_other_pos,
           max(weight) FILTER (WHERE key_pos > 0) AS top_other_weight
    FROM att GROUP BY prompt, layer, head
)
SELECT s.prompt, s.word, s.template_index, g.layer, g.head, g.mass_first, g.mass_template,
       g.mass_word, g.mass_suffix, g.mass_last, g.top_other_pos, g.top_other_weight,
       t.token_text AS top_other_token, t.role_name AS top_other_role
FROM agg g
JOIN sel s ON s.prompt = g.prompt
LEFT JOIN tokens t ON t.prompt = g.prompt AND t.position = g.top_other_pos
ORDER BY s.prompt, g.head
