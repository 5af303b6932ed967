"""Benchmarks (`python -m moeray.bench.<name>`)."""
