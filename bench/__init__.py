"""Measurements against a real server process, run by hand."""
