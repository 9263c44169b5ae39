-- The active-learning loop, per round (a selection): pairs selected and answered, and how the machine
-- verifiers' verdicts agree with the people's answers (`human_labels`, every tool). Presence: precision and
-- recall of the machines' `present` and `absent` against the person's answer; masks: of the machines'
-- `accept` against the masks the person kept (a dropped mask is a wrong one). $human_verifiers: who is a person.
WITH selected AS (
    SELECT selection, count(*) AS selected, min(created_at) AS created_at
    FROM selections
    GROUP BY selection
),
answered AS (
    SELECT selection, count(*) AS answered, count(*) FILTER (present) AS present, sum(drawn_masks)::BIGINT AS drawn_masks
    FROM human_labels
    GROUP BY selection
),
machine_presence AS (
    SELECT h.selection, h.present, v.presence
    FROM human_labels AS h
    JOIN pair_verifications AS v USING (pair_id)
    WHERE NOT list_contains($human_verifiers, v.verifier)
),
presence AS (
    SELECT
        selection,
        count(*) FILTER (presence = 'present' AND present) / nullif(count(*) FILTER (presence = 'present'), 0) AS present_precision,
        count(*) FILTER (presence = 'present' AND present) / nullif(count(*) FILTER (present), 0) AS present_recall,
        count(*) FILTER (presence = 'absent' AND NOT present) / nullif(count(*) FILTER (presence = 'absent'), 0) AS absent_precision,
        count(*) FILTER (presence = 'absent' AND NOT present) / nullif(count(*) FILTER (NOT present), 0) AS absent_recall
    FROM machine_presence
    GROUP BY selection
),
judged_masks AS (
    SELECT h.selection, mask_id, true AS good FROM human_labels AS h, unnest(h.kept_mask_ids) AS t(mask_id)
    UNION ALL
    SELECT h.selection, mask_id, false FROM human_labels AS h, unnest(h.dropped_mask_ids) AS t(mask_id)
),
masks AS (
    SELECT
        j.selection,
        count(*) FILTER (v.verdict = 'accept' AND j.good) / nullif(count(*) FILTER (v.verdict = 'accept'), 0) AS accept_precision,
        count(*) FILTER (v.verdict = 'accept' AND j.good) / nullif(count(*) FILTER (j.good), 0) AS accept_recall
    FROM judged_masks AS j
    JOIN mask_verifications AS v USING (mask_id)
    WHERE NOT list_contains($human_verifiers, v.verifier)
    GROUP BY j.selection
),
gold AS (
    SELECT h.selection, count(*) AS gold_pairs, count(DISTINCT s.concept_id) AS gold_concepts
    FROM human_labels AS h
    JOIN splits AS s USING (pair_id)
    WHERE s.tier = 'gold' AND list_has_any(s.sources, $human_verifiers)
    GROUP BY h.selection
)
SELECT
    selected.selection,
    selected.created_at,
    selected.selected,
    coalesce(answered.answered, 0) AS answered,
    selected.selected - coalesce(answered.answered, 0) AS pending,
    coalesce(answered.present, 0) AS answered_present,
    coalesce(answered.drawn_masks, 0) AS drawn_masks,
    presence.present_precision,
    presence.present_recall,
    presence.absent_precision,
    presence.absent_recall,
    masks.accept_precision,
    masks.accept_recall,
    coalesce(gold.gold_pairs, 0) AS gold_pairs,
    coalesce(gold.gold_concepts, 0) AS gold_concepts
FROM selected
LEFT JOIN answered USING (selection)
LEFT JOIN presence USING (selection)
LEFT JOIN masks USING (selection)
LEFT JOIN gold USING (selection)
ORDER BY selected.created_at, selected.selection
