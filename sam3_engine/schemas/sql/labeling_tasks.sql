-- What a labelling tool gets for selection $selection: its pairs with their image (location and size), and
-- every mask the engine proposed for them (the pre-annotations), by image and rank. A pair with no masks has
-- one row with a NULL mask_id.
SELECT
    s.image_id, i.uri, i.width AS image_width, i.height AS image_height, s.pair_id, s.concept_id, s.phrase, s.rank,
    m.mask_id, m.height, m.width, m.rle_counts, m.score
FROM selections AS s
JOIN images AS i USING (image_id)
LEFT JOIN masks AS m USING (pair_id)
WHERE s.selection = $selection
ORDER BY s.rank, m.score DESC, m.mask_id
