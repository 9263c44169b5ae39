-- A labelling tool's pulled answers ($tool, every selection) as the labels import-labels reads, so that they
-- become the verdicts of verifier $tool: one row per answered pair (present, and exhaustive when present: the
-- person was asked to paint every instance), one per engine mask the person kept (good) or deleted (not good).
SELECT pair_id, present, CASE WHEN present THEN true END AS exhaustive, NULL::VARCHAR AS mask_id, NULL::BOOLEAN AS good
FROM human_labels
WHERE tool = $tool
UNION ALL
SELECT NULL, NULL, NULL, unnest(kept_mask_ids), true
FROM human_labels
WHERE tool = $tool
UNION ALL
SELECT NULL, NULL, NULL, unnest(dropped_mask_ids), false
FROM human_labels
WHERE tool = $tool
ORDER BY pair_id, mask_id
