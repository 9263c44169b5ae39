-- One page of a concept's mask gallery, for the live dashboard: the concept's pairs with masks in a fixed
-- order (a hash of concept and image, as gallery_sample), $page_size of them from $offset, each mask with its
-- score and verdict ($verifier's; NULL: the first verifier's by name), and the concept's count of such pairs.
-- $pair_id (NULL: every pair of the page) narrows it to one pair: a tile asked for by itself.
WITH concept_pairs AS (
    SELECT pair_id, image_id, phrase, count(*) OVER () AS pairs_with_masks
    FROM pairs
    WHERE concept_id = $concept_id AND instance_count > 0
),
page AS (
    SELECT *
    FROM concept_pairs
    ORDER BY md5($concept_id || image_id), pair_id
    LIMIT $page_size OFFSET $offset
),
chosen AS (
    SELECT * FROM page WHERE $pair_id IS NULL OR pair_id = $pair_id
),
verdicts AS (
    SELECT mask_id, verdict, reasons
    FROM mask_verifications
    WHERE concept_id = $concept_id AND ($verifier IS NULL OR verifier = $verifier)
    QUALIFY row_number() OVER (PARTITION BY mask_id ORDER BY verifier) = 1
)
SELECT
    chosen.phrase, chosen.pair_id, chosen.image_id, chosen.pairs_with_masks, images.uri, masks.mask_id, masks.height,
    masks.width, masks.rle_counts, masks.score, coalesce(verdicts.verdict, 'unverified') AS verdict, verdicts.reasons
FROM chosen
JOIN images USING (image_id)
JOIN masks USING (pair_id)
LEFT JOIN verdicts USING (mask_id)
WHERE masks.concept_id = $concept_id
ORDER BY md5($concept_id || chosen.image_id), chosen.pair_id, masks.score DESC, masks.mask_id
