"""HLSS (Hierarchical Language-tied Self-Supervision) model, losses, sampler, training and kNN
evaluation on the cohort store. Not built yet: see the project's open issues."""
