"""Measurements against real server processes, run by hand: `python -m bench`.

Also a Django app, loaded only by the benchmark's servers
(TRANSPORT_EXTRA_APPS=bench), for the actions in bench/actions.py.
"""
