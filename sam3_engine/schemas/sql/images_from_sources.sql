-- One row per distinct image: every input with the same bytes (image_id) collapses into one row
-- that keeps all of its URIs, captions, alt texts and provenance labels. Only images that several
-- inputs share are aggregated (a hash table of those alone); the rest pass straight through, so the
-- query's memory follows the duplicates, not the corpus.
-- $unit_id: the derivation unit that writes the rows.
WITH shared AS (
    SELECT image_id FROM sources GROUP BY image_id HAVING count(*) > 1
)
SELECT
    image_id,
    uri,
    [uri]                                                      AS uris,
    width,
    height,
    format,
    mode,
    num_bytes,
    exif_orientation,
    list_sort(list_distinct(captions))                         AS captions,
    CASE WHEN alt_text IS NULL THEN [] ELSE [alt_text] END     AS alt_texts,
    CASE WHEN source IS NULL THEN [] ELSE [source] END         AS sources,
    list_sort(list_distinct(phrases))                          AS phrases,
    $unit_id                                                   AS unit_id
FROM sources
WHERE image_id NOT IN (SELECT image_id FROM shared)
UNION ALL
SELECT
    image_id,
    min(uri)                                                   AS uri,
    list(DISTINCT uri ORDER BY uri)                            AS uris,
    any_value(width)                                           AS width,
    any_value(height)                                          AS height,
    any_value(format)                                          AS format,
    any_value(mode)                                            AS mode,
    any_value(num_bytes)                                       AS num_bytes,
    any_value(exif_orientation)                                AS exif_orientation,
    list_sort(list_distinct(flatten(list(captions))))          AS captions,
    coalesce(list_sort(list_distinct(list(alt_text) FILTER (alt_text IS NOT NULL))), []) AS alt_texts,
    coalesce(list_sort(list_distinct(list(source) FILTER (source IS NOT NULL))), [])     AS sources,
    list_sort(list_distinct(flatten(list(phrases))))           AS phrases,
    $unit_id                                                   AS unit_id
FROM sources
WHERE image_id IN (SELECT image_id FROM shared)
GROUP BY image_id
