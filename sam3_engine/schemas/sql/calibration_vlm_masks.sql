-- Human-labelled masks (table `labels`) with a VLM verifier's verdicts and answers.
SELECT
    l.mask_id,
    l.good,
    m.score,
    s.whole_yes,
    v.verdict
FROM labels AS l
JOIN masks AS m ON m.mask_id = l.mask_id
LEFT JOIN vlm_mask_scores AS s ON s.mask_id = l.mask_id AND s.verifier = $verifier
JOIN mask_verifications AS v ON v.mask_id = l.mask_id AND v.verifier = $verifier
WHERE l.good IS NOT NULL
