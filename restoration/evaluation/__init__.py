"""Evaluation of restorations: full-reference metrics under the papers' conventions (metrics.py)."""
