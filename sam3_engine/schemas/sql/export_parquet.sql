-- The Parquet export: one row per pair of the split and tiers, with the masks its first source accepted (none for negatives).
SELECT
    e.pair_id, e.image_id, e.uri, e.width, e.height, e.concept_id, e.phrase, e.kind, e.tier, e.split, e.source,
    coalesce(m.masks, []) AS masks
FROM export_pairs($split, $tiers, $source) AS e
LEFT JOIN (
    SELECT pair_id, list({'mask_id': mask_id, 'rle_counts': rle_counts, 'bbox': bbox, 'area': area, 'score': score} ORDER BY mask_id) AS masks
    FROM export_masks($split, $tiers, $source)
    GROUP BY pair_id
) AS m USING (pair_id)
ORDER BY e.pair_id
