-- Ontology coverage, rolled up the parent chain: for each branch (a concept of the ontology in use, or of the
-- user's vocabulary, with everything below it), how many of its concepts reach $min_positives verified
-- (Gold or Silver) positive pairs. Branches only (a concept with another below it); thinnest first.
WITH RECURSIVE ontology AS (
    SELECT concept_id, phrase, parent
    FROM concepts
    WHERE list_has_any(sources, ['lvis', 'coco', 'user_ontology', 'vocabulary'])
),
positives AS (
    SELECT * FROM verified_positives()
),
lineage(concept_id, branch, depth) AS (
    SELECT concept_id, phrase, 0 FROM ontology
    UNION ALL
    SELECT lineage.concept_id, concepts.parent, lineage.depth + 1
    FROM lineage
    JOIN concepts ON concepts.phrase = lineage.branch
    WHERE concepts.parent IS NOT NULL AND lineage.depth < 32
)
SELECT
    branch,
    count(DISTINCT concept_id) AS concepts,
    count(DISTINCT concept_id) FILTER (coalesce(verified_positives, 0) >= $min_positives) AS covered,
    round(covered / concepts, 4) AS covered_share,
    coalesce(sum(verified_positives), 0)::BIGINT AS verified_positives
FROM (SELECT DISTINCT concept_id, branch FROM lineage)
LEFT JOIN positives USING (concept_id)
GROUP BY branch
HAVING count(DISTINCT concept_id) > 1
ORDER BY covered_share, concepts DESC, branch
