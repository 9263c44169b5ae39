-- The concepts table with the config's propose.phrases (the `asked` relation: concept_id, phrase, registered by
-- the propose stage) added to it, not put in its place: mine's concepts (the ontology, the mined phrases) stay,
-- a concept both mined and asked gets the source 'propose.phrases' as well, and an asked one mine does not have
-- is added with that source alone. A concept an earlier propose run added, and no longer asked, is dropped.
-- $unit_id: the derivation unit that writes the added rows.
WITH others AS (
    SELECT * REPLACE (list_filter(sources, lambda s: s <> 'propose.phrases') AS sources)
    FROM concepts
    WHERE len(list_filter(sources, lambda s: s <> 'propose.phrases')) > 0
)
SELECT
    others.concept_id,
    others.phrase,
    others.spellings,
    others.parent,
    others.synonyms,
    CASE WHEN asked.concept_id IS NULL THEN others.sources ELSE list_sort(list_append(others.sources, 'propose.phrases')) END AS sources,
    others.unit_id
FROM others
LEFT JOIN asked USING (concept_id)
UNION ALL
SELECT asked.concept_id, asked.phrase, []::VARCHAR[], NULL::VARCHAR, []::VARCHAR[], ['propose.phrases'], $unit_id
FROM asked
WHERE asked.concept_id NOT IN (SELECT concept_id FROM others)
ORDER BY concept_id
