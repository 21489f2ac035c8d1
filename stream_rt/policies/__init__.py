"""Policies: when to call the model (trigger), and the budget that limits it."""
