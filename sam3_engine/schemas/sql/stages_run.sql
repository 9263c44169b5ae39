-- Stages that ran in some attempt of the run, even on no input (their tables may then be unwritten).
SELECT DISTINCT name
FROM (SELECT unnest(json_extract_string(summary_json, '$.stages[*].name')) AS name FROM runs WHERE summary_json IS NOT NULL)
ORDER BY name
