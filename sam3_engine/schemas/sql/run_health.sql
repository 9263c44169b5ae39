-- Run health per ledger (a stage, a verifier, a derived table): committed units, their inputs and rows, the
-- counters model stages record per unit (OOM retries, batch splits, model seconds, peak memory), and the
-- inputs that killed their worker twice (rejected as worker_crashed; a crash a retry got past costs nothing).
WITH crashed AS (
    SELECT stage, count(*) AS worker_crashes
    FROM rejects
    WHERE reason = 'worker_crashed'
    GROUP BY stage
)
SELECT
    stage,
    count(*) AS units,
    sum(num_inputs)::BIGINT AS inputs,
    sum(list_sum(map_values(rows_written)))::BIGINT AS rows_written,
    any_value(coalesce(crashed.worker_crashes, 0)) AS worker_crashes,
    sum(coalesce(stats['oom_retries'], 0))::BIGINT AS oom_retries,
    sum(coalesce(stats['batch_splits'], 0))::BIGINT AS batch_splits,
    round(sum(stats['model_seconds']), 2) AS model_seconds,
    round(sum(num_inputs) FILTER (stats['model_seconds'] > 0) / sum(stats['model_seconds']), 2) AS inputs_per_model_second,
    round(max(stats['peak_rss_mib'])) AS peak_rss_mib,
    round(max(stats['peak_gpu_mib'])) AS peak_gpu_mib,
    min(committed_at) AS first_commit,
    max(committed_at) AS last_commit
FROM units
LEFT JOIN crashed USING (stage)
GROUP BY stage
ORDER BY first_commit, stage
