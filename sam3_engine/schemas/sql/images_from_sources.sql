-- One row per distinct image: every input with the same bytes (image_id) collapses into one row
-- that keeps all of its URIs, captions, alt texts and provenance labels.
-- $unit_id: the derivation unit that writes the rows.
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
GROUP BY image_id
ORDER BY image_id
