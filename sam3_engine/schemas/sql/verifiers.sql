-- Every verifier with verdicts in the run, by name: what --verifier of report and dashboard may name.
SELECT verifier FROM pair_verifications
UNION
SELECT verifier FROM mask_verifications
ORDER BY verifier
