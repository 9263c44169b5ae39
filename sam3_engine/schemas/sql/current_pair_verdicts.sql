-- The pair verdicts the verify stage stores: pair_verdicts at the config's thresholds over the mask
-- verdicts just computed (temp table current_mask_verdicts), plus the thresholds as JSON.
SELECT *, $thresholds AS thresholds
FROM pair_verdicts(
    verifier_name := $verifier_name,
    mask_table := 'current_mask_verdicts',
    sam_weight := $sam_weight,
    clip_weight := $clip_weight,
    presence_bias := $presence_bias,
    present_threshold := $present_threshold,
    absent_threshold := $absent_threshold,
    max_uncovered_fraction := $max_uncovered_fraction,
    high_score := $high_score
)
