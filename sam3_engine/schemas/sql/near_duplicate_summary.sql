-- Near-duplicates (the dedup stage's `near_duplicates`): images hashed, groups of two or more images,
-- the images in them, the largest group, and groups whose pairs sit in more than one split (0 once
-- the splits stage has run after dedup).
SELECT
    count(*) AS images,
    count(DISTINCT group_id) FILTER (group_size > 1) AS groups,
    count(*) FILTER (group_size > 1) AS images_in_groups,
    coalesce(max(group_size), 0) AS largest_group,
    (
        SELECT count(*)
        FROM (
            SELECT d.group_id
            FROM splits AS s
            JOIN near_duplicates AS d USING (image_id)
            GROUP BY d.group_id
            HAVING count(DISTINCT s.split) > 1
        )
    ) AS groups_in_two_splits
FROM near_duplicates
