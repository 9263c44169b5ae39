-- Verdicts from stored scores, as two table macros: thresholds re-tune in SQL, no model runs.
-- The parameters are the config's `verify` thresholds, same names, same defaults: catalog.connect fills in
-- each {{... thresholds}} from their one declaration (MaskThresholds, PairThresholds in engine/config.py). Examples:
--   SELECT verdict, count(*) FROM mask_verdicts(min_stability := 0.9) GROUP BY verdict;
--   SELECT exhaustivity, count(*) FROM pair_verdicts(max_uncovered_fraction := 0.1) GROUP BY exhaustivity;
-- pair_verdicts reads mask verdicts from the table named by `mask_table` (by default the stored
-- `mask_verifications`); to re-tune both levels, materialise mask_verdicts(...) first:
--   CREATE TEMP TABLE mv AS SELECT * FROM mask_verdicts(min_stability := 0.9);
--   SELECT * FROM pair_verdicts(mask_table := 'mv');

-- Mask verification (MV): reasons from the scores; reject when a reason is in reject_reasons,
-- uncertain when there are only other reasons, accept when there are none. A null score (a signal
-- that was not computed, such as reprompt_iou with re-prompting off) gives no reason.
CREATE OR REPLACE MACRO mask_verdicts(
    verifier_name := 'sam3-clip',
    {{mask_verdicts thresholds}}
) AS TABLE
WITH reasoned AS (
    SELECT
        s.mask_id, s.pair_id, s.image_id, s.concept_id, m.score, s.verifier, s.verifier_version,
        list_filter([
            CASE WHEN s.area_fraction < min_area_fraction THEN 'too_small' END,
            CASE WHEN s.fragments > max_fragments OR s.largest_fragment_fraction < min_largest_fragment THEN 'fragmented' END,
            CASE WHEN s.border_fraction > max_border_fraction THEN 'border_hugging' END,
            CASE WHEN s.duplicate_iou > max_duplicate_iou THEN 'duplicate' END,
            CASE WHEN s.conflict_iou > max_conflict_iou THEN 'conflict' END,
            CASE WHEN m.stability_score < min_stability THEN 'unstable' END,
            CASE WHEN m.reprompt_iou < min_reprompt_iou THEN 'reprompt_inconsistent' END,
            CASE WHEN s.clip_crop_margin < min_clip_margin THEN 'clip_mismatch' END
        ], lambda reason: reason IS NOT NULL) AS reasons
    FROM mask_scores AS s
    JOIN masks AS m USING (mask_id)
    WHERE s.verifier = verifier_name
)
SELECT
    mask_id, pair_id, image_id, concept_id, score,
    CASE
        WHEN len(list_intersect(reasons, reject_reasons::VARCHAR[])) > 0 THEN 'reject'
        WHEN len(reasons) > 0 THEN 'uncertain'
        ELSE 'accept'
    END AS verdict,
    reasons, verifier, verifier_version
FROM reasoned;

-- Presence and exhaustivity (EV) per pair.
-- Presence: sigmoid(sam_weight * logit(SAM 3 presence) + clip_weight * clip_z + presence_bias),
-- present at or above present_threshold, absent at or below absent_threshold, else uncertain.
-- Exhaustivity: do the accepted masks cover every instance? SAM 3's semantic foreground outside their
-- union, rejected high-scoring masks (not mere duplicates or conflicts) and presence agreement decide.
CREATE OR REPLACE MACRO pair_verdicts(
    verifier_name := 'sam3-clip',
    mask_table := 'mask_verifications',
    {{pair_verdicts thresholds}}
) AS TABLE
WITH mask_verdict AS (
    SELECT v.pair_id, v.verdict, v.score, v.reasons, m.rle_counts
    FROM query_table(mask_table) AS v
    JOIN masks AS m USING (mask_id)
    WHERE v.verifier = verifier_name
),
per_pair AS (
    SELECT
        pair_id,
        count(*) FILTER (verdict = 'accept') AS accepted,
        list(rle_counts) FILTER (verdict = 'accept') AS accepted_counts,
        count(*) FILTER (
            verdict = 'reject' AND score >= high_score
            AND len(list_filter(reasons, lambda r: r NOT IN ('duplicate', 'conflict'))) > 0
        ) AS rejected_high_score
    FROM mask_verdict
    GROUP BY pair_id
),
presence AS (
    SELECT
        p.pair_id, p.image_id, p.concept_id, p.phrase, p.height, p.width, p.foreground_counts,
        p.presence_score AS sam_presence, s.clip_z, s.verifier, s.verifier_version,
        greatest(least(p.presence_score, 1 - 1e-6), 1e-6) AS clamped
    FROM pairs AS p
    JOIN pair_scores AS s USING (pair_id)
    WHERE s.verifier = verifier_name
),
judged AS (
    SELECT
        presence.*,
        1 / (1 + exp(-(sam_weight * ln(clamped / (1 - clamped)) + clip_weight * coalesce(clip_z, 0) + presence_bias))) AS presence_probability,
        coalesce(per_pair.accepted, 0) AS accepted,
        coalesce(per_pair.rejected_high_score, 0) AS rejected_high_score,
        rle_uncovered_fraction(height, width, foreground_counts, coalesce(per_pair.accepted_counts, [])) AS uncovered_fraction
    FROM presence
    LEFT JOIN per_pair USING (pair_id)
),
classified AS (
    SELECT
        *,
        CASE
            WHEN presence_probability >= present_threshold THEN 'present'
            WHEN presence_probability <= absent_threshold THEN 'absent'
            ELSE 'uncertain'
        END AS presence
    FROM judged
),
reasoned AS (
    SELECT
        *,
        CASE
            WHEN clip_z IS NULL THEN 'sam_only'
            WHEN (sam_presence >= 0.5) = (clip_z >= 0) THEN 'signals_agree'
            WHEN presence = 'uncertain' THEN 'signals_disagree'
            WHEN (presence = 'present') = (sam_presence >= 0.5) THEN 'sam_outweighs_clip'
            ELSE 'clip_outweighs_sam'
        END AS presence_reason,
        CASE
            WHEN presence = 'uncertain' THEN 'presence_uncertain'
            WHEN presence = 'absent' AND accepted = 0 THEN 'absent_without_masks'
            WHEN presence = 'absent' THEN 'absent_with_masks'
            WHEN accepted = 0 THEN 'present_without_masks'
            WHEN uncovered_fraction > max_uncovered_fraction THEN 'uncovered_foreground'
            WHEN rejected_high_score > 0 THEN 'rejected_high_score_mask'
            ELSE 'covered'
        END AS exhaustivity_reason
    FROM classified
)
SELECT
    pair_id, image_id, concept_id, phrase, presence_probability, presence, presence_reason,
    accepted::INTEGER AS accepted_masks, uncovered_fraction,
    MAP {
        'presence_uncertain': 'unknown', 'absent_without_masks': 'exhaustive', 'absent_with_masks': 'unknown',
        'present_without_masks': 'not_exhaustive', 'uncovered_foreground': 'not_exhaustive',
        'rejected_high_score_mask': 'not_exhaustive', 'covered': 'exhaustive'
    }[exhaustivity_reason] AS exhaustivity,
    exhaustivity_reason, verifier, verifier_version
FROM reasoned;

-- The VLM verifier's verdicts (`verify_vlm`), from its P(yes) answers in vlm_mask_scores and vlm_pair_scores:
-- the same verdict columns as above, so splits, calibrate and the reports read both verifiers alike.
--   SELECT verdict, count(*) FROM vlm_mask_verdicts(accept_threshold := 0.7) GROUP BY verdict;
-- A mask: accept at or above accept_threshold, reject at or below reject_threshold, else uncertain. A mask
-- the VLM could not be shown (its size is not its image's) has no answer and is uncertain.
CREATE OR REPLACE MACRO vlm_mask_verdicts(
    verifier_name := 'vlm',
    {{vlm_mask_verdicts thresholds}}
) AS TABLE
SELECT
    s.mask_id, s.pair_id, s.image_id, s.concept_id, m.score,
    CASE
        WHEN s.whole_yes >= accept_threshold THEN 'accept'
        WHEN s.whole_yes <= reject_threshold THEN 'reject'
        ELSE 'uncertain'
    END AS verdict,
    CASE
        WHEN s.whole_yes IS NULL THEN ['vlm_not_shown']
        WHEN s.whole_yes >= accept_threshold THEN []
        WHEN s.whole_yes <= reject_threshold THEN ['vlm_not_whole']
        ELSE ['vlm_unsure']
    END::VARCHAR[] AS reasons,
    s.verifier, s.verifier_version
FROM vlm_mask_scores AS s
JOIN masks AS m USING (mask_id)
WHERE s.verifier = verifier_name;

-- A pair: presence from P(yes) to "is there a <phrase>?"; exhaustivity from P(yes) to "is every <phrase>
-- highlighted?", asked with all of the pair's proposed masks drawn (so it speaks for the accepted ones
-- when every mask is accepted, which Gold requires).
CREATE OR REPLACE MACRO vlm_pair_verdicts(
    verifier_name := 'vlm',
    mask_table := 'mask_verifications',
    {{vlm_pair_verdicts thresholds}}
) AS TABLE
WITH per_pair AS (
    SELECT pair_id, count(*) FILTER (verdict = 'accept') AS accepted
    FROM query_table(mask_table)
    WHERE verifier = verifier_name
    GROUP BY pair_id
),
classified AS (
    SELECT
        s.pair_id, p.image_id, p.concept_id, p.phrase, s.presence_yes AS presence_probability, s.exhaustive_yes,
        coalesce(per_pair.accepted, 0) AS accepted, s.verifier, s.verifier_version,
        CASE
            WHEN s.presence_yes >= present_threshold THEN 'present'
            WHEN s.presence_yes <= absent_threshold THEN 'absent'
            ELSE 'uncertain'
        END AS presence
    FROM vlm_pair_scores AS s
    JOIN pairs AS p USING (pair_id)
    LEFT JOIN per_pair USING (pair_id)
    WHERE s.verifier = verifier_name
),
reasoned AS (
    SELECT
        *,
        CASE presence WHEN 'present' THEN 'vlm_yes' WHEN 'absent' THEN 'vlm_no' ELSE 'vlm_unsure' END AS presence_reason,
        CASE
            WHEN presence = 'uncertain' THEN 'presence_uncertain'
            WHEN presence = 'absent' AND accepted = 0 THEN 'absent_without_masks'
            WHEN presence = 'absent' THEN 'absent_with_masks'
            WHEN accepted = 0 THEN 'present_without_masks'
            WHEN exhaustive_yes <= not_exhaustive_threshold THEN 'vlm_instances_missing'
            WHEN exhaustive_yes >= exhaustive_threshold THEN 'covered'
            ELSE 'vlm_coverage_unsure'
        END AS exhaustivity_reason
    FROM classified
)
SELECT
    pair_id, image_id, concept_id, phrase, presence_probability, presence, presence_reason,
    accepted::INTEGER AS accepted_masks, NULL::DOUBLE AS uncovered_fraction,
    MAP {
        'presence_uncertain': 'unknown', 'absent_without_masks': 'exhaustive', 'absent_with_masks': 'unknown',
        'present_without_masks': 'not_exhaustive', 'vlm_instances_missing': 'not_exhaustive',
        'vlm_coverage_unsure': 'unknown', 'covered': 'exhaustive'
    }[exhaustivity_reason] AS exhaustivity,
    exhaustivity_reason, verifier, verifier_version
FROM reasoned;
