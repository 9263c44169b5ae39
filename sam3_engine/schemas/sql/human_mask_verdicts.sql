-- Human mask labels (table `labels`) as mask verdicts of verifier $verifier: good is accept, not good is reject.
SELECT
    m.mask_id, m.pair_id, m.image_id, m.concept_id, m.score,
    CASE WHEN l.good THEN 'accept' ELSE 'reject' END AS verdict,
    CASE WHEN l.good THEN []::VARCHAR[] ELSE ['human_rejected'] END AS reasons,
    $verifier AS verifier,
    'labels' AS verifier_version,
    '{}' AS thresholds
FROM labels AS l
JOIN masks AS m USING (mask_id)
WHERE l.good IS NOT NULL
ORDER BY m.mask_id
