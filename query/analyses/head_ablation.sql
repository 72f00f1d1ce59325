-- name: head_ablation
-- description: Effect of ablating each head of one block on the target (default block: each
--   prompt's emergence layer), ranked within the prompt; empty without ablation shards.
-- param: layer INTEGER = NULL | block index; NULL = each prompt's emergence layer (prompts with no emergence block, NULL or -1, are left out: give a layer to include every prompt)
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode ('zero' or 'mean'; NULL = every mode)
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: layer INTEGER | block whose heads were ablated
-- column: head INTEGER | head index
-- column: mode VARCHAR | ablation mode
-- column: logit_diff FLOAT | clean minus ablated target logit (> 0: the head helped)
-- column: target_logit FLOAT | target logit after ablation
-- column: target_prob FLOAT | target probability after ablation
-- column: target_rank INTEGER | target rank after ablation
-- column: top1_id INTEGER | top-1 token after ablation
-- column: top1_text VARCHAR | its text
-- column: kl FLOAT | KL(clean || ablated), nats
-- column: ablation_rank INTEGER | 1 = largest logit_diff among this prompt's heads (per mode)
-- column: emergence_layer INTEGER | the prompt's emergence layer
WITH sel AS (
    SELECT p.prompt, p.word, p.template_index, e.emergence_layer,
           coalesce(CAST($layer AS INTEGER), e.emergence_layer) AS layer
    FROM prompts p JOIN emergence e ON e.prompt = p.prompt
)
SELECT s.prompt, s.word, s.template_index, s.layer, a.head, a.mode, a.logit_diff,
       a.target_logit, a.target_prob, a.target_rank, a.top1_id, a.top1_text, a.kl,
       CAST(rank() OVER (PARTITION BY s.prompt, a.mode ORDER BY a.logit_diff DESC) AS INTEGER)
           AS ablation_rank,
       s.emergence_layer
FROM sel s
JOIN ablation a ON a.prompt = s.prompt AND a.layer = s.layer AND a.unit_kind = 'head'
WHERE CAST($mode AS VARCHAR) IS NULL OR a.mode = CAST($mode AS VARCHAR)
ORDER BY s.prompt, a.mode, a.head
