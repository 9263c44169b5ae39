-- How many images each concept was mined for (hard negatives excluded), most frequent first.
SELECT
    phrase,
    count(DISTINCT image_id) AS images
FROM candidates
WHERE origin <> 'hard_negative'
GROUP BY phrase
ORDER BY images DESC, phrase
