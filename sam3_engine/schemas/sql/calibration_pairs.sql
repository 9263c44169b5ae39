-- Human-labelled pairs (table `labels`) with one verifier's verdicts and presence signals.
SELECT
    l.pair_id,
    l.present,
    l.exhaustive,
    v.presence_probability,
    p.presence_score AS sam_presence,
    s.clip_z,
    v.presence,
    v.exhaustivity
FROM labels AS l
JOIN pair_verifications AS v ON v.pair_id = l.pair_id AND v.verifier = $verifier
JOIN pairs AS p ON p.pair_id = l.pair_id
LEFT JOIN pair_scores AS s ON s.pair_id = l.pair_id AND s.verifier = $verifier
WHERE l.present IS NOT NULL OR l.exhaustive IS NOT NULL
