"""What supervision costs (issue #7): mi50d against running llama-server by hand.

`python -m bench` runs every section, prints one table and writes BENCHMARKS.md. Each figure is a
ratio or a difference against a baseline measured in the same run, as a median with its spread.
Benchmarks print figures; they never assert them.
"""
