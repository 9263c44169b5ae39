-- Human-labelled masks (table `labels`) with one verifier's verdicts and, where it stored them, its mask scores.
SELECT
    l.mask_id,
    l.good,
    m.score,
    m.stability_score,
    m.reprompt_iou,
    s.clip_crop_margin,
    s.area_fraction,
    s.largest_fragment_fraction,
    s.border_fraction,
    s.duplicate_iou,
    s.conflict_iou,
    v.verdict
FROM labels AS l
JOIN masks AS m ON m.mask_id = l.mask_id
LEFT JOIN mask_scores AS s ON s.mask_id = l.mask_id AND s.verifier = $verifier
JOIN mask_verifications AS v ON v.mask_id = l.mask_id AND v.verifier = $verifier
WHERE l.good IS NOT NULL
