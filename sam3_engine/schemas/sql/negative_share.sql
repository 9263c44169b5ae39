-- The share of negatives among the pairs the splits kept (Gold and Silver), and of hard negatives among those:
-- SA-Co's benchmark is about 88% negatives.
SELECT
    count(*) FILTER (tier IN ('gold', 'silver')) AS kept_pairs,
    count(*) FILTER (tier IN ('gold', 'silver') AND kind = 'negative') AS negatives,
    count(*) FILTER (tier IN ('gold', 'silver') AND kind = 'negative' AND hard_negative) AS hard_negatives,
    round(negatives / nullif(kept_pairs, 0), 4) AS negative_share,
    round(hard_negatives / nullif(negatives, 0), 4) AS hard_negative_share
FROM splits
