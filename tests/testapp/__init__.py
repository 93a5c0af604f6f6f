"""Actions and commands for the tests, loaded with TRANSPORT_EXTRA_APPS=tests.testapp.

Servers and `runworker` processes started by the tests load this app, so an
action sent to any server runs the same handler on whichever process gets it.
"""
