-- name: compare_depth_profile
-- description: Models side by side along relative depth (comparison): each model's blocks in
--   `bins` equal bins of layer / n_layers (bin b: b/bins <= layer/n_layers < (b+1)/bins), and
--   per bin its heads' attention on position 0 from the last position (mean over prompts; the
--   bin's mean, largest, and the share of heads whose mean is at least `threshold`, >=), their
--   DLA and their ablation effect. Not the sink_share analysis (Gu et al. 2025's definition:
--   attention averaged over every query position, per prompt, strictly above the threshold);
--   0.3 is the threshold Gu et al. use.
-- param: bins INTEGER = 10 | number of equal relative-depth bins (at least 1)
-- param: threshold DOUBLE = 0.3 | a head whose mean attention on position 0 is at least this (>=) counts as a sink
-- param: mode VARCHAR {zero,mean} = 'zero' | ablation mode
-- column: model VARCHAR | the model's label
-- column: depth_bin INTEGER | floor(layer * bins / n_layers)
-- column: rel_lo DOUBLE | the bin's start, depth_bin / bins
-- column: rel_hi DOUBLE | the bin's end, (depth_bin + 1) / bins
-- column: n_blocks BIGINT | the model's blocks in the bin
-- column: n_heads BIGINT | heads in those blocks
-- column: mean_mass_first DOUBLE | mean over those heads of their mean attention on position 0
-- column: max_mass_first DOUBLE | the largest head's
-- column: sink_share DOUBLE | fraction of those heads whose mean attention on position 0 (from the last position) is at least the threshold (>=)
-- column: mean_dla DOUBLE | mean over those heads of their mean DLA
-- column: max_dla DOUBLE | the largest head's mean DLA
-- column: mean_logit_diff DOUBLE | mean over the bin's ablated heads of their mean ablation effect (NULL: none ablated)
-- column: max_logit_diff DOUBLE | the largest head's mean ablation effect
WITH cfg AS (
    SELECT CASE WHEN CAST($bins AS INTEGER) >= 1 THEN CAST($bins AS INTEGER)
                ELSE error('parameter bins must be at least 1') END AS bins
),
h AS (
    SELECT model, layer, head, avg(weight) AS mass
    FROM attention WHERE query_role = 4 AND key_pos = 0
    GROUP BY model, layer, head
),
d AS (
    SELECT model, layer, head, avg(dla) AS dla
    FROM dla WHERE component = 'head'
    GROUP BY model, layer, head
),
a AS (
    SELECT model, layer, head, avg(logit_diff) AS diff
    FROM ablation WHERE unit_kind = 'head' AND mode = CAST($mode AS VARCHAR)
    GROUP BY model, layer, head
),
j AS (
    SELECT d.model, d.layer, d.head, h.mass, d.dla, a.diff, (d.layer * cfg.bins) // m.n_layers AS depth_bin, cfg.bins
    FROM d
    CROSS JOIN cfg
    JOIN models m ON m.model = d.model
    LEFT JOIN h ON h.model = d.model AND h.layer = d.layer AND h.head = d.head
    LEFT JOIN a ON a.model = d.model AND a.layer = d.layer AND a.head = d.head
)
SELECT model, depth_bin::INTEGER AS depth_bin, depth_bin / any_value(bins) AS rel_lo,
       (depth_bin + 1) / any_value(bins) AS rel_hi,
       count(DISTINCT layer) AS n_blocks, count(*) AS n_heads,
       avg(mass) AS mean_mass_first, max(mass) AS max_mass_first,
       count(*) FILTER (WHERE mass >= CAST($threshold AS DOUBLE)) / count(mass) AS sink_share,
       avg(dla) AS mean_dla, max(dla) AS max_dla,
       avg(diff) AS mean_logit_diff, max(diff) AS max_logit_diff
FROM j
GROUP BY model, depth_bin
ORDER BY model, depth_bin
