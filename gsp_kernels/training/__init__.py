"""Metric learning with GSP: datasets and benchmarks, models, recipes, the training loop and
its protocols (standard, mlrc), evaluation, the demo and the training-step benchmark."""
