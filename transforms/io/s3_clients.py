"""One boto3 S3 client per process and set of options, for Beam's S3 filesystem.

Beam's ``S3FileSystem`` builds a new ``boto3.session.Session()`` and client for every file it opens
or checks (``apache_beam.io.aws.clients.s3.boto3_client.Client``): each new session parses the S3
service model's JSON again, ~0.4 s of CPU. A chain stage reads several staging files per shard, so
on an object store that was most of a small run's time (a 700-document quad run: 131 clients,
53 of its 106 s). boto3 clients are thread-safe, so the sessions that Beam's module creates hand
out one shared client per distinct set of client arguments (endpoint, region, keys: a handful per
process, never more with the corpus). Installed when ``beamsift.transforms`` is imported, so on
every worker that unpickles a beamsift DoFn.
"""

from __future__ import annotations

import threading

_LOCK = threading.Lock()
_CLIENTS: dict = {}


class _SharedSession:
    """Stands in for ``boto3.session.Session`` inside Beam's S3 client module only."""

    def __init__(self, *args, **kwargs):
        self._args = (args, tuple(sorted(kwargs.items())))

    def client(self, *args, **kwargs):
        import boto3

        key = (self._args, args, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        with _LOCK:
            if key not in _CLIENTS:
                session = boto3.session.Session(*self._args[0], **dict(self._args[1]))
                _CLIENTS[key] = session.client(*args, **kwargs)
            return _CLIENTS[key]


class _Boto3:
    """The ``boto3`` name in Beam's S3 client module: the real module, but sessions that share clients."""

    def __init__(self, real):
        self._real = real
        self.session = type("session", (), {"Session": _SharedSession})

    def __getattr__(self, name):
        return getattr(self._real, name)


def share_s3_clients() -> None:
    try:
        from apache_beam.io.aws.clients.s3 import boto3_client
    except ImportError:  # Beam without its AWS extra: no S3 filesystem to speed up
        return
    if boto3_client.boto3 is not None and not isinstance(boto3_client.boto3, _Boto3):
        boto3_client.boto3 = _Boto3(boto3_client.boto3)
