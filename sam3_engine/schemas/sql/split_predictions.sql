-- Every mask SAM 3 proposed for the pairs of a split and tiers, numbered as the SA-Co export numbers them.
SELECT e.pair_number, m.mask_id, m.height, m.width, m.rle_counts, m.bbox, m.score
FROM export_pairs($split, $tiers, 1) AS e
JOIN masks AS m USING (pair_id)
ORDER BY e.pair_number, m.mask_id
