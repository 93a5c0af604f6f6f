"""Database engines that count and time statements into django-prometheus's metrics.

They export the same `django_db_*` series as django-prometheus's engines,
at a fraction of the cost per statement: the instrumented cursor class is
built once per connection rather than once per cursor, and the labelled
series are looked up once rather than on every statement.
"""
