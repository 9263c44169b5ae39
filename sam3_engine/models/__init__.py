"""Model wrappers (SAM 3, CLIP) behind a narrow interface; they never import Ray."""
