-- name: dla_vs_ablation
-- description: DLA and ablation effect of every head side by side (default block: each
--   prompt's emergence layer); flags heads with a large ablation effect but small DLA, whose
--   effect on the target goes through later layers (indirect). Empty without ablation shards.
-- param: layer INTEGER = NULL | block index; NULL = each prompt's emergence layer (prompts with no emergence block, NULL or -1, are left out: give a layer to include every prompt)
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode ('zero' or 'mean'; NULL = every mode)
-- param: top INTEGER = 3 | "large" = in the top `top` heads by ablation, "small" = not in the top `top` by DLA
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: layer INTEGER | block index
-- column: head INTEGER | head index
-- column: mode VARCHAR | ablation mode
-- column: dla FLOAT | direct logit attribution to the target
-- column: logit_diff FLOAT | total effect: clean minus ablated target logit
-- column: indirect FLOAT | logit_diff - dla: the effect not explained by the head's direct path with the final norm frozen (later layers, and the change of the final norm's scale)
-- column: dla_rank INTEGER | 1 = largest DLA among the prompt's heads (ties share the best rank)
-- column: ablation_rank INTEGER | 1 = largest logit_diff among the prompt's heads
-- column: large_ablation_small_dla BOOLEAN | ablation_rank <= top and dla_rank > top
WITH sel AS (
    SELECT p.prompt, p.word, p.template_index,
           coalesce(CAST($layer AS INTEGER), e.emergence_layer) AS layer
    FROM prompts p JOIN emergence e ON e.prompt = p.prompt
),
d AS (
    SELECT s.prompt, s.word, s.template_index, s.layer, d.head, d.dla,
           rank() OVER (PARTITION BY s.prompt ORDER BY d.dla DESC) AS dla_rank
    FROM sel s JOIN dla d ON d.prompt = s.prompt AND d.layer = s.layer AND d.component = 'head'
),
a AS (
    SELECT a.prompt, a.layer, a.head, a.mode, a.logit_diff,
           rank() OVER (PARTITION BY a.prompt, a.layer, a.mode ORDER BY a.logit_diff DESC)
               AS ablation_rank
    FROM ablation a
    WHERE a.unit_kind = 'head'
      AND (CAST($mode AS VARCHAR) IS NULL OR a.mode = CAST($mode AS VARCHAR))
)
SELECT d.prompt, d.word, d.template_index, d.layer, d.head, a.mode, d.dla, a.logit_diff,
       a.logit_diff - d.dla AS indirect,
       CAST(d.dla_rank AS INTEGER) AS dla_rank,
       CAST(a.ablation_rank AS INTEGER) AS ablation_rank,
       a.ablation_rank <= CAST($top AS INTEGER) AND d.dla_rank > CAST($top AS INTEGER)
           AS large_ablation_small_dla
FROM d
JOIN a ON a.prompt = d.prompt AND a.layer = d.layer AND a.head = d.head
ORDER BY d.prompt, a.mode, d.head
