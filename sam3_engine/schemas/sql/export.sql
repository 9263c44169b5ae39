-- Macros of the export: the pairs of one split and tiers, and the masks each export file keeps.
-- A pair confirmed by several sources (Gold) is exported once per source: file k follows the k-th
-- source of each pair (or its last, when it has fewer), with the masks that source accepted (and, for a
-- labelling tool's answer, the masks the person drew there).

CREATE OR REPLACE TEMP MACRO export_pairs(split_name, tier_list, source_index) AS TABLE
SELECT
    s.pair_id,
    row_number() OVER (ORDER BY s.pair_id) AS pair_number,
    s.image_id, i.uri, p.width, p.height, s.concept_id, s.phrase, s.kind, s.tier, s.split,
    s.sources[least(source_index, len(s.sources))] AS source,
    len(s.sources) AS source_count,
    v.uncovered_fraction
FROM splits AS s
JOIN pairs AS p USING (pair_id)
JOIN images AS i ON i.image_id = s.image_id
LEFT JOIN pair_verifications AS v ON v.pair_id = s.pair_id AND v.verifier = s.sources[least(source_index, len(s.sources))]
WHERE s.split = split_name AND list_contains(tier_list::VARCHAR[], s.tier)
ORDER BY s.pair_id;

CREATE OR REPLACE TEMP MACRO export_masks(split_name, tier_list, source_index) AS TABLE
SELECT
    row_number() OVER (ORDER BY e.pair_id, m.mask_id) AS mask_number,
    e.pair_number, e.pair_id, e.image_id, e.concept_id, e.source,
    m.mask_id, m.height, m.width, m.rle_counts, m.bbox, m.area, m.score
FROM export_pairs(split_name, tier_list, source_index) AS e
JOIN (
    SELECT m.pair_id, m.mask_id, m.height, m.width, m.rle_counts, m.bbox, m.area, m.score, v.verifier
    FROM masks AS m
    JOIN mask_verifications AS v ON v.mask_id = m.mask_id AND v.verdict = 'accept'
    UNION ALL  -- the masks people drew in a labelling tool belong to the pair's answer from that tool
    SELECT pair_id, mask_id, height, width, rle_counts, bbox, area, 1.0::FLOAT, tool
    FROM human_masks
) AS m ON m.pair_id = e.pair_id AND m.verifier = e.source
WHERE e.kind = 'positive'
ORDER BY e.pair_id, m.mask_id;
