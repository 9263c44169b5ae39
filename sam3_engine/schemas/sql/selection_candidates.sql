-- Candidates for human review: every proposed pair that no person has labelled ($human_verifiers) and that no
-- other selection than $selection has sent out, with each strategy's score in [0, 1] (README: selection
-- strategies). The filters are here; the weighted, image-by-image choice is sam3_engine/labeling/select.py's.
WITH human AS (
    SELECT pair_id FROM pair_verifications WHERE list_contains($human_verifiers, verifier)
    UNION
    SELECT pair_id FROM mask_verifications WHERE list_contains($human_verifiers, verifier)
),
taken AS (
    SELECT pair_id FROM selections WHERE selection <> $selection
),
presence AS (
    SELECT
        pair_id,
        avg(presence_probability) AS presence_probability,
        count(DISTINCT presence) > 1 AS presence_disagrees,
        bool_or(exhaustivity <> 'exhaustive' AND presence = 'present') AS doubtful_exhaustivity
    FROM pair_verifications
    WHERE NOT list_contains($human_verifiers, verifier)
    GROUP BY pair_id
),
mask_verdicts AS (
    SELECT pair_id, mask_id, count(DISTINCT verdict) > 1 AS disagrees, bool_or(verdict = 'uncertain') AS uncertain
    FROM mask_verifications
    WHERE NOT list_contains($human_verifiers, verifier)
    GROUP BY pair_id, mask_id
),
mask_doubt AS (
    SELECT pair_id, bool_or(disagrees) AS masks_disagree, bool_or(uncertain) AS uncertain_masks
    FROM mask_verdicts
    GROUP BY pair_id
),
mask_quality AS (
    SELECT
        pair_id,
        bool_or(stability_score < $min_stability OR coalesce(reprompt_iou, 1.0) < $min_reprompt_iou) AS unstable_masks
    FROM masks
    GROUP BY pair_id
),
fired AS (
    SELECT DISTINCT candidates.image_id, candidates.concept_id
    FROM candidates
    JOIN pairs USING (image_id, concept_id)
    WHERE candidates.origin = 'hard_negative' AND pairs.instance_count > 0
),
positives AS (
    SELECT * FROM verified_positives()
),
signals AS (
    SELECT
        pairs.pair_id,
        pairs.image_id,
        pairs.concept_id,
        pairs.phrase,
        -- presence: 1 inside the uncertain band, falling to 0 at $presence_margin beyond either threshold
        CASE
            WHEN presence.presence_probability IS NULL THEN 0.0
            WHEN presence.presence_probability > $absent_threshold AND presence.presence_probability < $present_threshold THEN 1.0
            ELSE greatest(0.0, 1.0 - least(
                abs(presence.presence_probability - $present_threshold), abs(presence.presence_probability - $absent_threshold)
            ) / $presence_margin)
        END AS near_threshold,
        coalesce(mask_doubt.uncertain_masks, false) AS uncertain_masks,
        coalesce(mask_quality.unstable_masks, false) AS unstable_masks,
        coalesce(presence.doubtful_exhaustivity, false) AS doubtful_exhaustivity,
        fired.concept_id IS NOT NULL AS fired_hard_negative,
        coalesce(presence.presence_disagrees, false) OR coalesce(mask_doubt.masks_disagree, false) AS verifiers_disagree,
        coalesce(splits.reason, '') AS split_reason,
        coalesce(positives.verified_positives, 0) AS verified_positives
    FROM pairs
    LEFT JOIN presence USING (pair_id)
    LEFT JOIN mask_doubt USING (pair_id)
    LEFT JOIN mask_quality USING (pair_id)
    LEFT JOIN splits USING (pair_id)
    LEFT JOIN fired ON fired.image_id = pairs.image_id AND fired.concept_id = pairs.concept_id
    LEFT JOIN positives ON positives.concept_id = pairs.concept_id
    WHERE pairs.pair_id NOT IN (SELECT pair_id FROM human) AND pairs.pair_id NOT IN (SELECT pair_id FROM taken)
)
SELECT
    pair_id,
    image_id,
    concept_id,
    phrase,
    -- any sign of doubt counts fully, presence by its closeness to a threshold; more signs rank higher
    (0.8 * greatest(
        near_threshold, uncertain_masks::DOUBLE, unstable_masks::DOUBLE, doubtful_exhaustivity::DOUBLE, fired_hard_negative::DOUBLE
    ) + 0.2 * (
        near_threshold + uncertain_masks::DOUBLE + unstable_masks::DOUBLE + doubtful_exhaustivity::DOUBLE + fired_hard_negative::DOUBLE
    ) / 5)::DOUBLE AS uncertainty,
    CASE
        WHEN split_reason = 'sources_disagree' OR verifiers_disagree THEN 1.0
        WHEN split_reason = 'unconfirmed' THEN 0.5
        ELSE 0.0
    END::DOUBLE AS disagreement,
    greatest(0.0, 1.0 - verified_positives / $min_positives)::DOUBLE AS coverage,
    (hash(pair_id || $seed)::DOUBLE / 18446744073709551616.0)::DOUBLE AS random
FROM signals
ORDER BY pair_id
