-- Per image, the concepts mined as present (any origin but hard_negative), by normal form.
SELECT
    image_id,
    list(DISTINCT phrase ORDER BY phrase) AS present
FROM candidates
WHERE origin <> 'hard_negative'
GROUP BY image_id
ORDER BY image_id
