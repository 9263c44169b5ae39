-- Gold gained from people per concept and round: pairs answered in selection rounds that splits made Gold on
-- a person's word ($human_verifiers), positives and negatives; most gained first.
SELECT
    h.selection,
    h.phrase,
    count(*) FILTER (s.kind = 'positive') AS gold_positives,
    count(*) FILTER (s.kind = 'negative') AS gold_negatives
FROM human_labels AS h
JOIN splits AS s USING (pair_id)
WHERE s.tier = 'gold' AND list_has_any(s.sources, $human_verifiers)
GROUP BY h.selection, h.phrase
ORDER BY gold_positives + gold_negatives DESC, h.selection, h.phrase
