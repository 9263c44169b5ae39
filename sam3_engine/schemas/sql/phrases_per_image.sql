-- The phrases to ask SAM 3 about on each image: every mined candidate (any origin, hard negatives
-- included), one entry per concept, in concept-id order so that a unit's fingerprint is stable.
SELECT
    i.image_id,
    i.uri,
    list(DISTINCT c.phrase ORDER BY c.phrase) AS phrases
FROM images AS i
JOIN candidates AS c USING (image_id)
GROUP BY i.image_id, i.uri
ORDER BY i.image_id
