-- Every near-duplicate group of two or more images, largest first: how its images are linked (phash,
-- mirrored, crop, clip), the closest pHash distance inside it, the splits its pairs sit in (one), and
-- its first three URIs.
WITH members AS (
    SELECT d.group_id, d.group_size, d.linked_by, d.phash_distance, d.clip_cosine, i.uri
    FROM near_duplicates AS d
    LEFT JOIN images AS i USING (image_id)
    WHERE d.group_size > 1
),
placed AS (
    SELECT d.group_id, list_sort(list_distinct(list(s.split))) AS splits
    FROM near_duplicates AS d
    JOIN splits AS s USING (image_id)
    WHERE d.group_size > 1
    GROUP BY d.group_id
)
SELECT
    m.group_id,
    any_value(m.group_size) AS images,
    array_to_string(list_sort(list_distinct(flatten(list(m.linked_by)))), ', ') AS linked_by,
    min(m.phash_distance) AS min_phash_distance,
    max(m.clip_cosine) AS max_clip_cosine,
    coalesce(array_to_string(any_value(p.splits), ', '), '') AS splits,
    array_to_string(list_slice(list_sort(list(m.uri)), 1, 3), ' ') AS first_uris
FROM members AS m
LEFT JOIN placed AS p USING (group_id)
GROUP BY m.group_id
ORDER BY images DESC, m.group_id
