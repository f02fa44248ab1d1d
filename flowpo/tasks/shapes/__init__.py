"""Shapes world: a miniature GenEval (prompts, renderer, detector, scorer, base model)."""
