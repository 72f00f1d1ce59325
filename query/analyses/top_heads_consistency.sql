-- name: top_heads_consistency
-- description: How often each head is among the top heads by ablation effect and by DLA
--   across words and templates, at one block (default: each prompt's emergence layer), e.g.
--   "head 2 is always in the top 3". Ablation columns are 0/NULL without ablation shards.
-- param: layer INTEGER = NULL | block index; NULL = each prompt's emergence layer (prompts with no emergence block, NULL or -1, are left out: give a layer to include every prompt)
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode
-- param: top INTEGER = 3 | size of the top group (ranks tie at the best rank, so a group can hold more heads)
-- column: head INTEGER | head index
-- column: n_prompts_dla BIGINT | prompts with DLA at the chosen layer
-- column: n_top_dla BIGINT | prompts where the head is in the top `top` by DLA
-- column: frac_top_dla DOUBLE | n_top_dla / n_prompts_dla
-- column: n_prompts_ablation BIGINT | prompts with ablation results at the chosen layer
-- column: n_top_ablation BIGINT | prompts where the head is in the top `top` by logit_diff
-- column: frac_top_ablation DOUBLE | n_top_ablation / n_prompts_ablation
-- column: mean_dla DOUBLE | mean DLA over those prompts
-- column: mean_logit_diff DOUBLE | mean ablation logit_diff over those prompts
WITH sel AS (
    SELECT p.prompt, coalesce(CAST($layer AS INTEGER), e.emergence_layer) AS layer
    FROM prompts p JOIN emergence e ON e.prompt = p.prompt
),
d AS (
    SELECT d.prompt, d.head, d.dla,
           rank() OVER (PARTITION BY d.prompt ORDER BY d.dla DESC) AS r
    FROM sel s JOIN dla d ON d.prompt = s.prompt AND d.layer = s.layer AND d.component = 'head'
),
a AS (
    SELECT a.prompt, a.head, a.logit_diff,
           rank() OVER (PARTITION BY a.prompt ORDER BY a.logit_diff DESC) AS r
    FROM sel s JOIN ablation a ON a.prompt = s.prompt AND a.layer = s.layer
    WHERE a.unit_kind = 'head' AND a.mode = CAST($mode AS VARCHAR)
),
dh AS (
    SELECT head, count(*) AS n, count(*) FILTER (WHERE r <= CAST($top AS INTEGER)) AS n_top,
           avg(dla) AS mean_v
    FROM d GROUP BY head
),
ah AS (
    SELECT head, count(*) AS n, count(*) FILTER (WHERE r <= CAST($top AS INTEGER)) AS n_top,
           avg(logit_diff) AS mean_v
    FROM a GROUP BY head
)
SELECT h.head,
       coalesce(dh.n, 0) AS n_prompts_dla, coalesce(dh.n_top, 0) AS n_top_dla,
       dh.n_top / dh.n AS frac_top_dla,
       coalesce(ah.n, 0) AS n_prompts_ablation, coalesce(ah.n_top, 0) AS n_top_ablation,
       ah.n_top / ah.n AS frac_top_ablation,
       dh.mean_v AS mean_dla, ah.mean_v AS mean_logit_diff
FROM heads h
LEFT JOIN dh ON dh.head = h.head
LEFT JOIN ah ON ah.head = h.head
ORDER BY h.head
