-- One row per concept: the ontology's and vocabulary's concepts (the `pool` relation, registered by
-- the mine stage) and every concept mined from the run's images, with the spellings it was found under.
-- $unit_id: the derivation unit that writes the rows.
WITH mined AS (
    SELECT
        concept_id,
        any_value(phrase)                                                          AS phrase,
        coalesce(list_sort(list_distinct(list(raw_phrase) FILTER (raw_phrase IS NOT NULL))), []) AS spellings,
        list_sort(list_distinct(list(origin)))                                     AS origins
    FROM candidates
    WHERE origin <> 'hard_negative'
    GROUP BY concept_id
)
SELECT
    concept_id,
    coalesce(pool.phrase, mined.phrase)                                                    AS phrase,
    coalesce(mined.spellings, [])                                                          AS spellings,
    pool.parent                                                                            AS parent,
    coalesce(pool.synonyms, [])                                                            AS synonyms,
    list_sort(list_distinct(list_concat(coalesce(pool.sources, []), coalesce(mined.origins, [])))) AS sources,
    $unit_id                                                                               AS unit_id
FROM pool FULL OUTER JOIN mined USING (concept_id)
ORDER BY concept_id
