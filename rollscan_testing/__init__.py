"""Rolls with defects at known places, for the demo, the tests and the benchmarks.

`synthetic_roll`: procedural fabric (`distill.data.synthetic`) with planted defects, written in
the scanner's format. `aitex_fabric_roll`: a roll stacked from real AITEX strips, and the
scoring of a run against its masks. `services`: the processes the tests and the benchmarks
start and stop (a free port, a scratch PostgreSQL database, `celery worker`s, moto's S3
server). Not part of the control plane: nothing in `scheduler/`, `worker/`, `storage/` or
`results/` imports this package.
"""
