"""Speed benchmarks that write JSON (`python -m benchmarks.run --out bench.json`)."""
