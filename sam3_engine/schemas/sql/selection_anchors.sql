-- Images the diversity strategy keeps its choice away from, with their CLIP embeddings: those a person has
-- labelled ($human_verifiers) and those out for review in a selection other than $selection.
WITH anchored AS (
    SELECT image_id FROM pair_verifications WHERE list_contains($human_verifiers, verifier)
    UNION
    SELECT image_id FROM selections WHERE selection <> $selection
)
SELECT image_id, embedding
FROM image_embeddings
WHERE image_id IN (SELECT image_id FROM anchored)
ORDER BY image_id
