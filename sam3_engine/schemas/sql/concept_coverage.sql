-- Coverage per concept: where it was asked (images by origin), what the proposals and the verifier said
-- ($verifier: whose verdicts count; NULL: every verifier's), and the Gold and Silver pairs the splits kept.
-- Concepts the run asked about, most verified positives first.
WITH asked AS (
    SELECT
        concept_id,
        any_value(phrase) AS phrase,
        count(DISTINCT image_id) AS images,
        count(DISTINCT image_id) FILTER (origin = 'caption') AS caption_images,
        count(DISTINCT image_id) FILTER (origin = 'user') AS user_images,
        count(DISTINCT image_id) FILTER (origin = 'vocabulary') AS vocabulary_images,
        count(DISTINCT image_id) FILTER (origin = 'clip') AS clip_images,
        count(DISTINCT image_id) FILTER (origin = 'hard_negative') AS hard_negative_images
    FROM candidates
    GROUP BY concept_id
),
proposed AS (
    SELECT concept_id, count(*) AS pairs, sum(instance_count)::BIGINT AS masks, avg(presence_score) AS mean_presence_score
    FROM pairs
    GROUP BY concept_id
),
presence AS (
    SELECT
        concept_id,
        count(*) FILTER (presence = 'present') AS present_pairs,
        count(*) FILTER (presence = 'absent') AS absent_pairs,
        count(*) FILTER (presence = 'uncertain') AS uncertain_pairs,
        avg(presence_probability) AS mean_presence_probability
    FROM pair_verifications
    WHERE $verifier IS NULL OR verifier = $verifier
    GROUP BY concept_id
),
judged AS (
    SELECT
        concept_id,
        count(*) FILTER (verdict = 'accept') AS accepted_masks,
        count(*) FILTER (verdict = 'uncertain') AS uncertain_masks,
        count(*) FILTER (verdict = 'reject') AS rejected_masks,
        avg(score) AS mean_mask_score
    FROM mask_verifications
    WHERE $verifier IS NULL OR verifier = $verifier
    GROUP BY concept_id
),
kept AS (
    SELECT
        concept_id,
        count(*) FILTER (tier = 'gold' AND kind = 'positive') AS gold_positives,
        count(*) FILTER (tier = 'gold' AND kind = 'negative') AS gold_negatives,
        count(*) FILTER (tier = 'silver' AND kind = 'positive') AS silver_positives,
        count(*) FILTER (tier = 'silver' AND kind = 'negative') AS silver_negatives
    FROM splits
    GROUP BY concept_id
)
SELECT
    asked.concept_id,
    asked.phrase,
    concepts.parent,
    asked.images,
    asked.caption_images,
    asked.user_images,
    asked.vocabulary_images,
    asked.clip_images,
    asked.hard_negative_images,
    coalesce(proposed.pairs, 0) AS pairs,
    coalesce(proposed.masks, 0) AS masks,
    coalesce(presence.present_pairs, 0) AS present_pairs,
    coalesce(presence.absent_pairs, 0) AS absent_pairs,
    coalesce(presence.uncertain_pairs, 0) AS uncertain_pairs,
    coalesce(judged.accepted_masks, 0) AS accepted_masks,
    coalesce(judged.uncertain_masks, 0) AS uncertain_masks,
    coalesce(judged.rejected_masks, 0) AS rejected_masks,
    coalesce(kept.gold_positives, 0) AS gold_positives,
    coalesce(kept.gold_negatives, 0) AS gold_negatives,
    coalesce(kept.silver_positives, 0) AS silver_positives,
    coalesce(kept.silver_negatives, 0) AS silver_negatives,
    coalesce(kept.gold_positives, 0) + coalesce(kept.silver_positives, 0) AS verified_positives,
    proposed.mean_presence_score,
    presence.mean_presence_probability,
    judged.mean_mask_score
FROM asked
LEFT JOIN concepts USING (concept_id)
LEFT JOIN proposed USING (concept_id)
LEFT JOIN presence USING (concept_id)
LEFT JOIN judged USING (concept_id)
LEFT JOIN kept USING (concept_id)
ORDER BY verified_positives DESC, asked.images DESC, asked.phrase
