-- Human pair labels (table `labels`) as presence and exhaustivity verdicts of verifier $verifier.
-- A pair's accepted masks are its masks labelled good and those the person drew (`human_masks`); an absent
-- pair without an exhaustivity label is exhaustive (there is nothing to find).
WITH good AS (
    SELECT m.pair_id, count(*) AS accepted
    FROM labels AS l
    JOIN masks AS m USING (mask_id)
    WHERE l.good
    GROUP BY m.pair_id
),
drawn AS (  -- masks the person drew in a labelling tool (a pull's verifier is the tool's name)
    SELECT pair_id, count(*) AS drawn
    FROM human_masks
    WHERE tool = $verifier
    GROUP BY pair_id
)
SELECT
    p.pair_id, p.image_id, p.concept_id, p.phrase,
    CASE WHEN l.present THEN 1.0 WHEN NOT l.present THEN 0.0 ELSE 0.5 END AS presence_probability,
    CASE WHEN l.present THEN 'present' WHEN NOT l.present THEN 'absent' ELSE 'uncertain' END AS presence,
    'human_label' AS presence_reason,
    (coalesce(g.accepted, 0) + coalesce(d.drawn, 0))::INTEGER AS accepted_masks,
    NULL::DOUBLE AS uncovered_fraction,
    CASE
        WHEN l.exhaustive THEN 'exhaustive'
        WHEN NOT l.exhaustive THEN 'not_exhaustive'
        WHEN NOT l.present THEN 'exhaustive'
        ELSE 'unknown'
    END AS exhaustivity,
    'human_label' AS exhaustivity_reason,
    $verifier AS verifier,
    'labels' AS verifier_version,
    '{}' AS thresholds
FROM labels AS l
JOIN pairs AS p USING (pair_id)
LEFT JOIN good AS g USING (pair_id)
LEFT JOIN drawn AS d USING (pair_id)
WHERE l.present IS NOT NULL OR l.exhaustive IS NOT NULL
ORDER BY p.pair_id
