-- Run against run: per concept, verified positives, present pairs and accepted masks in the other run (before)
-- and in this one (after), from each run's concept_coverage registered as before_coverage and after_coverage.
-- Concepts whose verified positives changed most first.
SELECT
    coalesce(after.concept_id, before.concept_id) AS concept_id,
    coalesce(after.phrase, before.phrase) AS phrase,
    coalesce(before.verified_positives, 0) AS positives_before,
    coalesce(after.verified_positives, 0) AS positives_after,
    positives_after - positives_before AS positives_change,
    coalesce(before.present_pairs, 0) AS present_before,
    coalesce(after.present_pairs, 0) AS present_after,
    coalesce(before.accepted_masks, 0) AS accepted_before,
    coalesce(after.accepted_masks, 0) AS accepted_after,
    before.concept_id IS NULL AS only_after,
    after.concept_id IS NULL AS only_before
FROM after_coverage AS after
FULL JOIN before_coverage AS before ON after.concept_id = before.concept_id
ORDER BY abs(positives_change) DESC, phrase
