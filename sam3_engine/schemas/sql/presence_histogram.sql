-- Presence probability in buckets of 0.05, by presence verdict ($verifier: whose verdicts; NULL: every verifier's).
SELECT presence, least(floor(presence_probability * 20) / 20, 0.95) AS bucket, count(*) AS pairs
FROM pair_verifications
WHERE ($verifier IS NULL OR verifier = $verifier) AND presence_probability IS NOT NULL
GROUP BY ALL
ORDER BY presence, bucket
