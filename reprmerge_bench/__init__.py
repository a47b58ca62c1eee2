"""Benchmarks of the serving stack (`reprmerge bench serve`): engine in-process and HTTP under load.

Kept out of `service` so benchmark code never ships in the serving package; it depends on both
`reprmerge_core` and `service`, and nothing depends on it but the CLI's `bench` command.
"""
