"""Reading what users hand the engine: input listings, manifests and images, and the run's stored embeddings."""
