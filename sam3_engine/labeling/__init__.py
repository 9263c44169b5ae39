"""The active-learning loop: choosing pairs for people to review, and the round trip through labelling tools."""
