"""Durable per-session mailboxes: sequence numbers, acks, TTL and capacity.

This package shadows the standard library's `mailbox` module. It resolves to
this app only while the repository root comes first on `sys.path`, as
`manage.py`, the server command and the test configuration arrange.
"""
