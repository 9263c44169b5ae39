-- Every judged pair's tier (gold, silver or excluded), kind (positive or negative) and split.
-- A source confirms a positive when it says present and exhaustive with accepted masks, a negative
-- when it says absent and exhaustive with no accepted mask. A human source (in $human) decides
-- alone; otherwise machine sources must not contradict each other. Gold: a human confirmation (a
-- positive with every mask accepted), or $gold_min_sources machine sources agreeing (for a
-- positive, each with every mask of the pair accepted). Silver: confirmed by fewer sources, or with
-- some mask not accepted (the export keeps the accepted ones). Negatives beyond
-- $max_negatives per image are excluded, hard negatives kept first. Splits are dealt per near-duplicate
-- group (`near_duplicates`, from the dedup stage): every image of a group lands in one split; an image
-- without a group (no dedup run) is a group of its own.
WITH sources AS (
    SELECT *
    FROM pair_verifications
    WHERE len($verifiers::VARCHAR[]) = 0 OR list_contains($verifiers::VARCHAR[], verifier)
),
mask_state AS (
    SELECT pair_id, verifier, count(*) FILTER (verdict <> 'accept') AS not_accepted
    FROM mask_verifications
    GROUP BY ALL
),
drawn AS (  -- a person who drew masks in a labelling tool gave the pair's whole answer: what they deleted does not count
    SELECT pair_id, tool AS verifier, count(*) AS drawn
    FROM human_masks
    GROUP BY ALL
),
votes AS (
    SELECT
        s.pair_id, s.image_id, s.concept_id, s.phrase, s.verifier,
        list_contains($human::VARCHAR[], s.verifier) AS human,
        CASE
            WHEN s.presence = 'present' AND s.exhaustivity = 'exhaustive' AND s.accepted_masks > 0 THEN 'positive'
            WHEN s.presence = 'absent' AND s.exhaustivity = 'exhaustive' AND s.accepted_masks = 0 THEN 'negative'
        END AS says,
        coalesce(m.not_accepted, 0) = 0 OR coalesce(d.drawn, 0) > 0 AS every_mask_accepted
    FROM sources AS s
    LEFT JOIN mask_state AS m USING (pair_id, verifier)
    LEFT JOIN drawn AS d USING (pair_id, verifier)
),
per_pair AS (
    SELECT
        pair_id,
        any_value(image_id) AS image_id,
        any_value(concept_id) AS concept_id,
        any_value(phrase) AS phrase,
        max(says) FILTER (human) AS human_says,
        bool_or(human AND every_mask_accepted) FILTER (says = 'positive') AS human_clean,
        count(*) FILTER (NOT human AND says = 'positive') AS positive_votes,
        count(*) FILTER (NOT human AND says = 'positive' AND every_mask_accepted) AS clean_positive_votes,
        count(*) FILTER (NOT human AND says = 'negative') AS negative_votes,
        list(verifier ORDER BY verifier) FILTER (says = 'positive') AS positive_sources,
        list(verifier ORDER BY verifier) FILTER (says = 'negative') AS negative_sources,
        list(verifier ORDER BY verifier) FILTER (human) AS human_sources
    FROM votes
    GROUP BY pair_id
),
decided AS (
    SELECT
        p.*,
        CASE
            WHEN human_says IS NOT NULL THEN human_says
            WHEN positive_votes > 0 AND negative_votes = 0 THEN 'positive'
            WHEN negative_votes > 0 AND positive_votes = 0 THEN 'negative'
        END AS kind,
        CASE
            WHEN human_says IS NOT NULL THEN 'human'
            WHEN positive_votes > 0 AND negative_votes > 0 THEN 'sources_disagree'
            WHEN positive_votes = 0 AND negative_votes = 0 THEN 'unconfirmed'
        END AS basis,
        coalesce(c.hard_negative, false) AS hard_negative
    FROM per_pair AS p
    LEFT JOIN (SELECT pair_id, bool_or(origin = 'hard_negative') AS hard_negative FROM candidates GROUP BY pair_id) AS c USING (pair_id)
),
tiered AS (
    SELECT
        *,
        CASE
            WHEN kind IS NULL THEN 'excluded'
            WHEN basis = 'human' AND (kind = 'negative' OR human_clean) THEN 'gold'
            WHEN basis = 'human' THEN 'silver'
            WHEN kind = 'positive' AND clean_positive_votes >= $gold_min_sources THEN 'gold'
            WHEN kind = 'negative' AND negative_votes >= $gold_min_sources THEN 'gold'
            ELSE 'silver'
        END AS tier,
        row_number() OVER (
            PARTITION BY image_id, kind = 'negative'
            ORDER BY hard_negative DESC, md5(pair_id || $salt)
        ) AS negative_rank
    FROM decided
)
SELECT
    pair_id, image_id, concept_id, phrase,
    CASE
        WHEN (md5_number(coalesce(d.group_id, image_id) || $salt) % 1000000) / 1000000.0 < $train THEN 'train'
        WHEN (md5_number(coalesce(d.group_id, image_id) || $salt) % 1000000) / 1000000.0 < $train + $val THEN 'val'
        ELSE 'test'
    END AS split,
    CASE WHEN kind = 'negative' AND negative_rank > $max_negatives THEN 'excluded' ELSE tier END AS tier,
    CASE WHEN kind = 'negative' AND negative_rank > $max_negatives THEN NULL ELSE kind END AS kind,
    CASE
        WHEN kind = 'negative' AND negative_rank > $max_negatives THEN 'negative_cap'
        WHEN kind IS NULL THEN basis
        WHEN basis = 'human' THEN 'human_' || kind
        WHEN tier = 'gold' THEN 'agreeing_' || kind
        WHEN kind = 'positive' AND positive_votes > clean_positive_votes THEN 'positive_with_rejected_masks'
        ELSE 'single_source_' || kind
    END AS reason,
    coalesce(CASE kind WHEN 'positive' THEN positive_sources WHEN 'negative' THEN negative_sources END, []) AS sources,
    hard_negative,
    $unit_id AS unit_id
FROM tiered
LEFT JOIN near_duplicates AS d USING (image_id)
ORDER BY pair_id
