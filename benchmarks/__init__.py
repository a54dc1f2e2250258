"""visitflow benchmarks: ``python -m benchmarks`` prints one table of side-by-side ratios."""
