-- The mask gallery's sample: the $concepts concepts with the most proposed pairs, and per concept at most
-- $per_concept pairs with masks, picked by a hash of (concept, image) so a run always shows the same ones;
-- each mask with its score and its verdict ($verifier's; NULL: the first verifier's by name).
WITH top_concepts AS (
    SELECT concept_id
    FROM pairs
    WHERE instance_count > 0
    GROUP BY concept_id
    ORDER BY count(*) DESC, any_value(phrase)
    LIMIT $concepts
),
picked AS (
    SELECT pair_id, image_id, concept_id, phrase
    FROM pairs
    WHERE instance_count > 0 AND concept_id IN (SELECT concept_id FROM top_concepts)
    QUALIFY row_number() OVER (PARTITION BY concept_id ORDER BY md5(concept_id || image_id)) <= $per_concept
),
verdicts AS (
    SELECT mask_id, verdict, reasons
    FROM mask_verifications
    WHERE $verifier IS NULL OR verifier = $verifier
    QUALIFY row_number() OVER (PARTITION BY mask_id ORDER BY verifier) = 1
)
SELECT
    picked.phrase, picked.pair_id, picked.image_id, images.uri, masks.mask_id, masks.height, masks.width,
    masks.rle_counts, masks.score, coalesce(verdicts.verdict, 'unverified') AS verdict, verdicts.reasons
FROM picked
JOIN images USING (image_id)
JOIN masks USING (pair_id)
LEFT JOIN verdicts USING (mask_id)
ORDER BY picked.phrase, picked.image_id, masks.score DESC, masks.mask_id
