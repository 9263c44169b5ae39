-- Per concept: its Gold and Silver pairs in each split, positives and negatives apart, to check balance.
SELECT
    phrase,
    tier,
    count(*) FILTER (split = 'train' AND kind = 'positive') AS train_positive,
    count(*) FILTER (split = 'val' AND kind = 'positive') AS val_positive,
    count(*) FILTER (split = 'test' AND kind = 'positive') AS test_positive,
    count(*) FILTER (split = 'train' AND kind = 'negative') AS train_negative,
    count(*) FILTER (split = 'val' AND kind = 'negative') AS val_negative,
    count(*) FILTER (split = 'test' AND kind = 'negative') AS test_negative
FROM splits
WHERE tier IN ('gold', 'silver')
GROUP BY phrase, tier
ORDER BY phrase, tier
