"""Operators: change detection, audio analysis, salience fusion."""
