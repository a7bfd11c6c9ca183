"""Benchmarks, run by hand from the repository root (`python -m benchmarks.NAME`);
results in benchmarks/RESULTS.md. Modules import each other as
`benchmarks.NAME`, with no `sys.path` edits."""
