-- Hard negatives on which SAM 3 kept an instance: the most valuable pairs to verify (either the
-- concept is present after all, or SAM 3 confuses it with the related present concept).
SELECT
    p.pair_id,
    p.image_id,
    p.phrase,
    related.phrase     AS confused_with,
    c.relation,
    p.instance_count,
    p.max_score,
    p.presence_score
FROM pairs AS p
JOIN candidates AS c USING (pair_id)
LEFT JOIN concepts AS related ON related.concept_id = c.related_concept_id
WHERE c.origin = 'hard_negative' AND p.instance_count > 0
ORDER BY p.max_score DESC, p.pair_id
