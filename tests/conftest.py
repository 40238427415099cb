"""Fixtures shared by every test file: the local S3 test server (see s3server.py)."""

from s3server import s3, s3_proxy, s3_server  # noqa: F401
