"""Language: how a phrase becomes a concept, ontologies, and noun phrases from captions."""
