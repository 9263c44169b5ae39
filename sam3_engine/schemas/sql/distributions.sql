-- The report's distributions, one row per (figure, bucket): concepts asked per image (hard negatives
-- excluded), instances per proposed pair, and mask area as a share of the image (log10 buckets).
SELECT 'concepts_per_image' AS figure, concepts AS bucket, count(*) AS n
FROM (
    SELECT image_id, count(DISTINCT concept_id) AS concepts
    FROM candidates
    WHERE origin <> 'hard_negative'
    GROUP BY image_id
)
GROUP BY concepts
UNION ALL
SELECT 'instances_per_pair', instance_count, count(*)
FROM pairs
GROUP BY instance_count
UNION ALL
SELECT 'mask_area_log10', floor(log10(greatest(area_fraction, 1e-6)) * 4) / 4, count(*)
FROM mask_scores
GROUP BY ALL
ORDER BY figure, bucket
