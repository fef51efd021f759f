"""Evaluation: perplexity, inference-cost numbers and the teacher-vs-upgraded report."""
