-- name: ablation_flips
-- description: Every (prompt, mode, layer, unit) whose ablation changes the top-1 token at the
--   last position, and to what. Before and after come from the same forward (the ablation
--   engine's clean run is the reference, never prompts.top1_id). Empty without ablation shards.
-- param: mode VARCHAR {zero,mean} = NULL | only this ablation mode (NULL: every mode)
-- param: unit_kind VARCHAR {head,attn,mlp} = NULL | 'head', 'attn' or 'mlp' (NULL: every kind)
-- param: layer INTEGER = NULL | only this block (NULL: every ablated block)
-- column: prompt INTEGER | prompt index
-- column: word VARCHAR | the word
-- column: template_index INTEGER | template number
-- column: mode VARCHAR | ablation mode
-- column: layer INTEGER | block index
-- column: unit INTEGER | unit index (0..H-1 heads, H attention block, H+1 MLP block)
-- column: unit_kind VARCHAR | 'head', 'attn' or 'mlp'
-- column: head INTEGER | head index (NULL for blocks)
-- column: clean_top1_id INTEGER | top-1 token of the engine's clean run
-- column: clean_top1_text VARCHAR | its text
-- column: new_top1_id INTEGER | top-1 token after ablation
-- column: new_top1_text VARCHAR | its text
-- column: new_top1_prob FLOAT | its probability
-- column: target_rank INTEGER | target rank after ablation
-- column: clean_target_rank INTEGER | target rank in the engine's clean run
-- column: logit_diff FLOAT | clean minus ablated target logit
-- column: kl FLOAT | KL(clean || ablated), nats
SELECT a.prompt, p.word, p.template_index, a.mode, a.layer, a.unit, a.unit_kind, a.head,
       a.clean_top1_id, a.clean_top1_text,
       a.top1_id AS new_top1_id, a.top1_text AS new_top1_text, a.top1_prob AS new_top1_prob,
       a.target_rank, a.clean_target_rank, a.logit_diff, a.kl
FROM ablation a
JOIN prompts p ON p.prompt = a.prompt
WHERE a.top1_changed
  AND (CAST($mode AS VARCHAR) IS NULL OR a.mode = CAST($mode AS VARCHAR))
  AND (CAST($unit_kind AS VARCHAR) IS NULL OR a.unit_kind = CAST($unit_kind AS VARCHAR))
  AND (CAST($layer AS INTEGER) IS NULL OR a.layer = CAST($layer AS INTEGER))
ORDER BY a.prompt, a.mode, a.layer, a.unit
