-- Concepts the run asked about that have fewer than $min_positives verified (Gold or Silver) positive pairs:
-- the list to act on (more images, a re-annotation round). Closest to the goal first.
WITH asked AS (
    SELECT concept_id, any_value(phrase) AS phrase, count(DISTINCT image_id) AS images
    FROM candidates
    WHERE origin <> 'hard_negative'
    GROUP BY concept_id
),
positives AS (
    SELECT * FROM verified_positives()
)
SELECT asked.phrase, concepts.parent, asked.images, coalesce(positives.verified_positives, 0) AS verified_positives
FROM asked
LEFT JOIN concepts USING (concept_id)
LEFT JOIN positives USING (concept_id)
WHERE coalesce(positives.verified_positives, 0) < $min_positives
ORDER BY verified_positives DESC, asked.images DESC, asked.phrase
