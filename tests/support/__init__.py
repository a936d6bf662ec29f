"""Harness the tests own and the bench imports: the redis-server and gunicorn processes they start."""
