-- Run health: every stage's rejects per reason, most first.
SELECT stage, reason, count(*) AS rejects
FROM rejects
GROUP BY stage, reason
ORDER BY rejects DESC, stage, reason
