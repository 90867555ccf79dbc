"""Metric learning with GSP: datasets, models, training loop, demo, training-step benchmark."""
