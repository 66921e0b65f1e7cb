"""Benchmarks: `python -m benchmarks <name> [--smoke]`, each writing `benchmarks/results/<name>.json`.

They call the project's real code in a temporary project folder, so they never touch the repo's DVC outputs.
"""
