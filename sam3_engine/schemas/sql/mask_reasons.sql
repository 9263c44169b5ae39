-- Mask verdicts and their reasons ($verifier: whose verdicts; NULL: every verifier's); a mask with several
-- reasons counts under each, one with none under "(none)".
SELECT verdict, coalesce(reason, '(none)') AS reason, count(*) AS masks
FROM (
    SELECT verdict, unnest(CASE WHEN len(reasons) = 0 THEN [NULL] ELSE reasons END) AS reason
    FROM mask_verifications
    WHERE $verifier IS NULL OR verifier = $verifier
)
GROUP BY ALL
ORDER BY masks DESC, verdict, reason
