-- The mask verdicts the verify stage stores: mask_verdicts at the config's thresholds, plus the thresholds as JSON.
SELECT *, $thresholds AS thresholds
FROM mask_verdicts(
    verifier_name := $verifier_name,
    min_area_fraction := $min_area_fraction,
    max_fragments := $max_fragments,
    min_largest_fragment := $min_largest_fragment,
    max_border_fraction := $max_border_fraction,
    max_duplicate_iou := $max_duplicate_iou,
    max_conflict_iou := $max_conflict_iou,
    min_stability := $min_stability,
    min_reprompt_iou := $min_reprompt_iou,
    min_clip_margin := $min_clip_margin,
    reject_reasons := $reject_reasons
)
