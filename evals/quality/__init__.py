"""Quality of plans on long inputs: needle retrieval, effective context, perplexity, the generated
documents they read, the methods compared (plans and baselines) and their statistics."""
