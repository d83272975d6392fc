"""`make scale`: many real daemons on 127.0.0.1 under the requirements' workload (tests/scale/run.py).

Built only on public interfaces (the `ipamd launch` flags, the hook socket, `status`, metrics,
`rmpeer`, the database read with apsw after the daemons stop), so it keeps working while the
internals change.
"""
