-- Measures the coverage queries share, as table macros (catalog.connect defines them on every connection).
-- Verified positives: per concept, the pairs the splits kept as Gold or Silver positives.
--   SELECT * FROM verified_positives() ORDER BY verified_positives DESC;
CREATE OR REPLACE MACRO verified_positives() AS TABLE
    SELECT concept_id, count(*) AS verified_positives
    FROM splits
    WHERE kind = 'positive' AND tier IN ('gold', 'silver')
    GROUP BY concept_id;
