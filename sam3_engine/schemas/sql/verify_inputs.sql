-- Per image with proposals: its URI and a digest of the proposal units that wrote its pairs, so that
-- a verification unit re-runs exactly when its images' proposals change.
SELECT
    p.image_id,
    any_value(i.uri) AS uri,
    md5(string_agg(p.pair_id || '@' || p.unit_id, ',' ORDER BY p.pair_id)) AS proposals
FROM pairs AS p
JOIN images AS i USING (image_id)
GROUP BY p.image_id
ORDER BY p.image_id
