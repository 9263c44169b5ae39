-- Human-labelled pairs (table `labels`) with a VLM verifier's verdicts and answers.
SELECT
    l.pair_id,
    l.present,
    l.exhaustive,
    v.presence_probability,
    s.exhaustive_yes,
    v.presence,
    v.exhaustivity
FROM labels AS l
JOIN pair_verifications AS v ON v.pair_id = l.pair_id AND v.verifier = $verifier
LEFT JOIN vlm_pair_scores AS s ON s.pair_id = l.pair_id AND s.verifier = $verifier
WHERE l.present IS NOT NULL OR l.exhaustive IS NOT NULL
