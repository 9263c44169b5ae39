-- How many concepts of the ontology in use (and of the user's vocabulary) reach $min_positives verified
-- (Gold or Silver) positive pairs, and how many the run asked about at all.
WITH ontology AS (
    SELECT concept_id
    FROM concepts
    WHERE list_has_any(sources, ['lvis', 'coco', 'user_ontology', 'vocabulary'])
),
positives AS (
    SELECT * FROM verified_positives()
)
SELECT
    count(*) AS concepts,
    count(*) FILTER (concept_id IN (SELECT concept_id FROM candidates)) AS asked,
    count(*) FILTER (coalesce(verified_positives, 0) >= $min_positives) AS covered
FROM ontology
LEFT JOIN positives USING (concept_id)
