"""The preference-serving microservice (`reprmerge serve`).

Layout, TEI-style: `app` (factory, thin /v1 and probe routes) and `oip` (Open Inference Protocol
v2 routes) translate HTTP; `runtime` holds the logic (validation, lifecycle, answers); `batcher`
(dynamic batching, admission control), `heads` (the heads thread: folds, head application and
trade-offs behind one bounded priority queue), `head_cache` (values by preference fingerprint) and
`engine` (bundle, backbone, folding, mixed-batch forward) do the work; `middleware`, `metrics`,
`errors`, `schemas` and `settings` are shared; `client` is the typed Python client; `server` runs
uvicorn with a graceful drain. The serving benchmark lives in `reprmerge_bench` (not shipped here), the command
line (`reprmerge serve`) in `reprmerge_cli`, above this package.
"""
