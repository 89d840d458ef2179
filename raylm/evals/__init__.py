"""Evaluation the way the field does it: EleutherAI's lm-evaluation-harness on a stage's weights, offline."""
