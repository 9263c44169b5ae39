-- Run health per ledger (a stage, a verifier, a derived table): committed units, their inputs and rows, and
-- the counters model stages record per unit (OOM retries, batch splits, model seconds, peak memory).
SELECT
    stage,
    count(*) AS units,
    sum(num_inputs)::BIGINT AS inputs,
    sum(list_sum(map_values(rows_written)))::BIGINT AS rows_written,
    sum(coalesce(stats['oom_retries'], 0))::BIGINT AS oom_retries,
    sum(coalesce(stats['batch_splits'], 0))::BIGINT AS batch_splits,
    round(sum(stats['model_seconds']), 2) AS model_seconds,
    round(sum(num_inputs) FILTER (stats['model_seconds'] > 0) / sum(stats['model_seconds']), 2) AS inputs_per_model_second,
    round(max(stats['peak_rss_mib'])) AS peak_rss_mib,
    round(max(stats['peak_gpu_mib'])) AS peak_gpu_mib,
    min(committed_at) AS first_commit,
    max(committed_at) AS last_commit
FROM units
GROUP BY stage
ORDER BY first_commit, stage
