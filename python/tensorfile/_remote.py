"""Object-store byte layer: URLs, stores, concurrent ranged reads and multipart writes.

Everything here moves bytes between an object store and memory the caller owns; it knows
nothing of tensors or file formats. The client is obstore (the Python binding of the Rust
``object_store`` crate): S3, GCS, Azure and HTTP behind one API, transfers run on its own
Tokio runtime with the GIL released, and ranged GETs return buffers we copy once into the
destination. obstore is an optional dependency (``tensorfile[s3]``); it is imported on
first use, so a local-files user never needs it.

URLs: ``s3://bucket/key``, ``gs://bucket/key``, ``az://container/key`` (also
``abfs[s]://container@account.dfs.core.windows.net/key``), ``http(s)://host/path``
(read-only) and ``file:///path`` (a local path). A string with any other ``scheme://`` is
an error, never a local directory named ``scheme:``.

S3 configuration is what the AWS CLI reads, in its order: the environment
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` before
``AWS_DEFAULT_REGION``), then the profile ``AWS_PROFILE`` (else ``default``) of the
shared credentials and config files (``AWS_SHARED_CREDENTIALS_FILE``, ``AWS_CONFIG_FILE``,
``~/.aws/...``); a profile without static keys (SSO, ``credential_process``, an assumed
role) is resolved by botocore when it is installed. An ``http://`` endpoint needs nothing
more. A per-call ``storage_options`` dict overrides all of it (see `store_for`).

Errors: every store error becomes one of FileNotFoundError (no such bucket or key),
PermissionError (access denied, bad credentials), `StoreThrottledError` (the store asked
us to slow down and retries ran out) or OSError, with the URL and the store's own message.
"""

from __future__ import annotations

import configparser
import datetime as _dt
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Any, NamedTuple

import numpy as np

from ._errors import FormatError

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_PART_NBYTES",
    "ObjectInfo",
    "ObjectURL",
    "RemoteReader",
    "StoreThrottledError",
    "abort_incomplete_uploads",
    "delete",
    "exists",
    "get_bytes",
    "has_url_scheme",
    "list_objects",
    "parse_url",
    "put_bytes",
    "resolve",
    "store_for",
    "upload",
]

#: Ranged GETs and multipart parts of this many bytes by default: large enough that request
#: overhead is small, small enough that `DEFAULT_CONCURRENCY` of them in flight stay modest.
DEFAULT_PART_NBYTES = 16 << 20
DEFAULT_CONCURRENCY = 16

# S3's multipart limits: every part but the last at least 5 MiB, at most 10,000 parts.
_MIN_PART_NBYTES = 5 << 20
_MAX_PARTS = 10_000

# Canonical store kind per URL scheme. http(s) is read-only.
_SCHEMES = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "azure": "az",
    "abfs": "az",
    "abfss": "az",
    "http": "http",
    "https": "http",
}

# RFC 3986 scheme followed by "://": "s3:" alone or "C:\\x" is not a URL.
_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")

# Fail fast on what cannot succeed, retry with back-off what the store calls retryable
# (5xx, 429/503 throttling, dropped connections): a refused connection surfaces in about
# ten seconds, a throttled store gets up to a minute of back-off.
_CLIENT_OPTIONS = {"connect_timeout": "5s", "timeout": "300s", "read_timeout": "60s"}
_RETRY_CONFIG = {
    "max_retries": 6,
    "retry_timeout": _dt.timedelta(seconds=60),
    "backoff": {
        "init_backoff": _dt.timedelta(milliseconds=100),
        "max_backoff": _dt.timedelta(seconds=8),
        "base": 2,
    },
}


class StoreThrottledError(OSError):
    """The object store kept refusing requests as too many (S3 SlowDown, HTTP 429/503)
    after every retry with back-off; retry later or lower the concurrency."""


class ObjectURL(NamedTuple):
    """A parsed object URL. `kind` is the canonical store ("s3", "gs", "az", "http");
    `bucket` the bucket or container (for http the ``scheme://host[:port]`` base);
    `key` the object's path inside it, without a leading slash; `url` as given."""

    kind: str
    bucket: str
    key: str
    url: str

    def child(self, name: str) -> ObjectURL:
        """The URL of `name` under this one taken as a directory."""
        key = f"{self.key.rstrip('/')}/{name}" if self.key else name
        base = self.url.split("://", 1)[0] + "://" + self.url.split("://", 1)[1].split("/")[0]
        return ObjectURL(self.kind, self.bucket, key, f"{base}/{key}")


def has_url_scheme(path: object) -> bool:
    """True when `path` is a str (or bytes) of the form ``scheme://...``. Path-like objects
    are never URLs; ``"s3:"`` or ``"s3:/x"`` without ``//`` is a local path."""
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    return isinstance(path, str) and _URL_RE.match(path) is not None


def parse_url(url: str) -> ObjectURL:
    """Split an object URL. Raises ValueError naming the scheme when it is not one we
    serve, and for a URL without a bucket."""
    m = _URL_RE.match(url)
    if m is None:
        raise ValueError(f"{url!r} is not a URL (expected scheme://bucket/key)")
    scheme = m.group(1).lower()
    kind = _SCHEMES.get(scheme)
    if kind is None:
        known = ", ".join(sorted({*_SCHEMES, "file"}))
        raise ValueError(f"{url}: unsupported URL scheme {scheme!r} (supported: {known})")
    rest = url[m.end() :]
    netloc, _, key = rest.partition("/")
    if not netloc:
        raise ValueError(f"{url}: no bucket in the URL (expected {scheme}://bucket/key)")
    if kind == "http":
        return ObjectURL(kind, f"{scheme}://{netloc}", key, url)
    return ObjectURL(kind, netloc, key, url)


def resolve(path: Any) -> Any:
    """What a path argument names: an `ObjectURL` for a remote URL, a local path str for
    ``file://...``, and `path` unchanged otherwise (plain strs, os.PathLike, file objects).
    Raises ValueError for a URL with an unknown scheme."""
    if not has_url_scheme(path):
        return path
    text = path.decode("utf-8", "surrogateescape") if isinstance(path, bytes) else path
    if text[:7].lower() == "file://":
        import urllib.parse
        import urllib.request

        # file:///abs/path and file://localhost/abs/path; percent-escapes decoded.
        parsed = urllib.parse.urlsplit(text)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{text}: file:// URLs name a local path, not host {parsed.netloc!r}")
        return urllib.request.url2pathname(parsed.path)
    return parse_url(text)


# --- stores ---------------------------------------------------------------------------

_stores: dict[Any, Any] = {}
_stores_lock = threading.Lock()

# Options that go to obstore's client, not to the store's own config.
_CLIENT_KEYS = {
    "allow_http",
    "allow_invalid_certificates",
    "connect_timeout",
    "default_content_type",
    "default_headers",
    "http1_only",
    "http2_only",
    "pool_idle_timeout",
    "pool_max_idle_per_host",
    "proxy_url",
    "proxy_ca_certificate",
    "proxy_excludes",
    "randomize_addresses",
    "read_timeout",
    "root_certificate",
    "timeout",
    "user_agent",
}
# The spellings fsspec/s3fs and boto3 users already pass, mapped to obstore's.
_S3_ALIASES = {
    "key": "access_key_id",
    "secret": "secret_access_key",
    "token": "session_token",
    "aws_access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
    "endpoint_url": "endpoint",
    "region_name": "region",
}
# Environment variables that feed an S3 store: part of the cache key, so a changed
# environment (another endpoint, other credentials) gets a fresh store.
_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def _obstore() -> Any:
    try:
        import obstore
    except ImportError as e:
        raise ImportError(
            "object-store URLs need obstore: pip install 'tensorfile[s3]' (or obstore)"
        ) from e
    return obstore


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def store_for(url: ObjectURL, storage_options: Mapping[str, Any] | None = None) -> Any:
    """The obstore store for `url`'s bucket, built once per (kind, bucket, options,
    relevant environment) and shared by every thread. `storage_options` overrides the
    environment: any key of obstore's store config (S3: ``endpoint``, ``region``,
    ``access_key_id``, ``secret_access_key``, ``session_token``, ``unsigned_payload``, ...;
    the s3fs/boto3 spellings ``key``, ``secret``, ``token``, ``endpoint_url``,
    ``region_name`` are accepted too), any client option (``allow_http``, ``timeout``,
    ``connect_timeout``, ...) and ``retry_config`` (a dict as obstore takes it)."""
    options = dict(storage_options or {})
    env = tuple(os.environ.get(k) for k in _S3_ENV) if url.kind == "s3" else ()
    cache_key = (url.kind, url.bucket, _freeze(options), env)
    with _stores_lock:
        store = _stores.get(cache_key)
    if store is not None:
        return store
    store = _build_store(url, options)
    with _stores_lock:
        return _stores.setdefault(cache_key, store)


def _build_store(url: ObjectURL, options: dict[str, Any]) -> Any:
    # Typed as Any: the options are checked by obstore at run time, not by its stubs.
    st: Any = _obstore().store

    retry = options.pop("retry_config", _RETRY_CONFIG)
    client: dict[str, Any] = dict(_CLIENT_OPTIONS)
    client.update(options.pop("client_options", {}) or {})
    client.update({k: options.pop(k) for k in list(options) if k in _CLIENT_KEYS})
    try:
        if url.kind == "s3":
            config = {_S3_ALIASES.get(k, k): v for k, v in options.items()}
            config, provider = _s3_config(config)
            if str(config.get("endpoint", "")).startswith("http://"):
                client.setdefault("allow_http", True)
            return st.S3Store(
                url.bucket,
                config=config,
                client_options=client,
                retry_config=retry,
                credential_provider=provider,
            )
        if url.kind == "gs":
            return st.GCSStore(
                url.bucket, config=options, client_options=client, retry_config=retry
            )
        if url.kind == "az":
            base = url.url.split("://", 1)[0] + "://" + url.bucket
            return st.AzureStore.from_url(
                base, config=options, client_options=client, retry_config=retry
            )
        if url.bucket.startswith("http://"):
            client.setdefault("allow_http", True)
        return st.HTTPStore.from_url(url.bucket, client_options=client, retry_config=retry)
    except Exception as e:
        raise _map_error(e, url.url) from e


def _s3_config(explicit: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The S3 config the AWS CLI would use, as obstore keys; `explicit` wins over all.

    obstore itself reads every ``AWS_*`` variable it knows, but not the shared files nor
    AWS_PROFILE, ``AWS_ENDPOINT_URL_S3``, or the CLI's rule that AWS_REGION beats
    AWS_DEFAULT_REGION (it takes whichever it meets last), so those are settled here and
    passed explicitly."""
    env = os.environ
    config: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    provider = None
    profile_name = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
    has_env_keys = bool(env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"))
    wants_keys = not has_env_keys and "access_key_id" not in explicit
    profile = _shared_profile(profile_name or "default")
    if profile_name and profile is None and wants_keys:
        raise ValueError(
            f"AWS_PROFILE={profile_name!r}: no such profile in the shared config or "
            "credentials file"
        )
    if profile is not None:
        region = region or profile.get("region")
        endpoint = endpoint or profile.get("endpoint_url")
        if wants_keys:
            if profile.get("aws_access_key_id") and profile.get("aws_secret_access_key"):
                config["access_key_id"] = profile["aws_access_key_id"]
                config["secret_access_key"] = profile["aws_secret_access_key"]
                if profile.get("aws_session_token"):
                    config["session_token"] = profile["aws_session_token"]
            else:
                provider = _botocore_provider(profile_name)
    if endpoint:
        config["endpoint"] = endpoint
    if region:
        config["region"] = region
    config.update(explicit)
    if provider is not None and "access_key_id" in config:
        provider = None
    return config, provider


def _shared_profile(name: str) -> dict[str, str] | None:
    """Profile `name` from the shared credentials file, then the config file (where it is
    ``[profile name]``, or ``[default]``); None when neither has it."""
    home = os.path.expanduser("~")
    creds = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join(
        home, ".aws", "credentials"
    )
    conf = os.environ.get("AWS_CONFIG_FILE") or os.path.join(home, ".aws", "config")
    found: dict[str, str] | None = None
    for path, section in (
        (conf, name if name == "default" else f"profile {name}"),
        (creds, name),
    ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(os.path.expanduser(path), encoding="utf-8")
        except (OSError, configparser.Error):
            continue
        if parser.has_section(section):
            found = found or {}
            # The credentials file's keys win over the config file's, as in the CLI.
            found.update({k: v.strip() for k, v in parser.items(section)})
    return found


class _BotocoreCredentials:
    """obstore credential provider backed by a botocore session: profiles with SSO,
    ``credential_process`` or ``role_arn``, refreshed by botocore when they expire."""

    def __init__(self, profile: str | None) -> None:
        import botocore.session

        self._creds = botocore.session.Session(profile=profile).get_credentials()
        if self._creds is None:
            raise PermissionError(f"AWS profile {profile or 'default'!r}: no credentials")

    def __call__(self) -> dict[str, Any]:
        frozen = self._creds.get_frozen_credentials()
        return {
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "token": frozen.token,
            "expires_at": None,
        }


def _botocore_provider(profile: str | None) -> Any:
    try:
        import botocore.session  # noqa: F401
    except ImportError:
        return None  # obstore's own chain: web identity, container and instance metadata
    return _BotocoreCredentials(profile)


# --- errors ---------------------------------------------------------------------------

_XML_CODE = re.compile(r"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_THROTTLE = ("SlowDown", "Throttl", "TooManyRequests", "RequestLimitExceeded")


def _store_message(exc: BaseException) -> str:
    """obstore's message without its Rust debug dump, with the S3 error code first."""
    text = str(exc).split("\n\nDebug source:", 1)[0].strip()
    code = _XML_CODE.search(text)
    msg = _XML_MESSAGE.search(text)
    if code:
        head = code.group(1) + (f": {msg.group(1)}" if msg else "")
        text = re.sub(r"<\?xml.*", "", text, flags=re.S).strip()
        return f"{head} ({text})"
    return text


def _map_error(exc: BaseException, url: str) -> OSError:
    """One exception for every store error, naming `url` and what the store said."""
    try:
        from obstore import exceptions as ox
    except ImportError:  # pragma: no cover - only reached with obstore installed
        return OSError(f"{url}: {exc}")
    if isinstance(exc, OSError) and f"{url}: " in str(exc):
        return exc  # mapped already
    said = _store_message(exc)
    if isinstance(exc, ox.NotFoundError) or "404 Not Found" in said:
        what = "no such bucket" if "NoSuchBucket" in said else "no such object"
        return FileNotFoundError(2, f"{url}: {what}: {said}", url)
    if isinstance(exc, (ox.PermissionDeniedError, ox.UnauthenticatedError)) or any(
        s in said for s in ("403 Forbidden", "401 Unauthorized")
    ):
        return PermissionError(13, f"{url}: access denied: {said}", url)
    if any(s in said for s in _THROTTLE) or "429 Too Many Requests" in said:
        return StoreThrottledError(f"{url}: throttled by the store after retries: {said}")
    if isinstance(exc, (ox.BaseError, OSError)):
        return OSError(f"{url}: {said}")
    return OSError(f"{url}: {type(exc).__name__}: {said}")


def _call(url: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        if isinstance(e, (ValueError, TypeError)) and not _is_store_error(e):
            raise
        raise _map_error(e, url) from e


def _is_store_error(exc: BaseException) -> bool:
    # obstore raises its own classes, and builtin FileNotFoundError for a missing object.
    return type(exc).__module__.split(".", 1)[0] == "obstore" or isinstance(exc, FileNotFoundError)


# --- reads ----------------------------------------------------------------------------


def _as_bytes_array(buffer: Any) -> np.ndarray:
    """A writable uint8 view of a C-contiguous buffer (memoryview, bytearray, numpy array,
    or anything with the buffer protocol)."""
    if isinstance(buffer, np.ndarray):
        arr = buffer.reshape(-1).view(np.uint8) if buffer.flags.c_contiguous else None
    else:
        mv = memoryview(buffer)
        arr = np.frombuffer(mv.cast("B") if mv.c_contiguous else mv, dtype=np.uint8)
        if not mv.c_contiguous:
            arr = None
    if arr is None:
        raise TypeError("destination buffer must be C-contiguous")
    if not arr.flags.writeable:
        raise TypeError("destination buffer is read-only")
    return arr


class RemoteReader:
    """Random access to one object by ranged GETs; thread-safe.

    `nbytes` costs one HEAD unless a read already learnt it (every ranged GET's
    Content-Range carries the object's size). Reads copy each response once, from the
    client's buffer into the caller's memory; no whole-object buffer is ever built."""

    def __init__(self, url: str | ObjectURL, storage_options: Mapping[str, Any] | None = None):
        self.url = parse_url(url) if isinstance(url, str) else url
        self._store = store_for(self.url, storage_options)
        self._nbytes: int | None = None

    @property
    def nbytes(self) -> int:
        """The object's length in bytes. Raises FileNotFoundError when it does not exist."""
        if self._nbytes is None:
            obs = _obstore()
            meta = _call(self.url.url, obs.head, self._store, self.url.key)
            self._nbytes = int(meta["size"])
        return self._nbytes

    def read_into(self, file_offset: int, buffer: Any) -> int:
        """Fill `buffer` with the object's bytes from `file_offset` by one ranged GET;
        returns the byte count read, short only at the end of the object (0 at or past
        the end). The GIL is released during the transfer, held for the final memcpy."""
        dst = _as_bytes_array(buffer)
        if dst.nbytes == 0:
            return 0
        if self._nbytes is not None and file_offset >= self._nbytes:
            return 0
        obs = _obstore()
        end = file_offset + dst.nbytes
        try:
            result = obs.get(self._store, self.url.key, options={"range": (file_offset, end)})
            data = result.bytes()
        except Exception as e:
            # A range starting at or past the end is a 416 to S3; only then is it no error.
            if "416" in str(e) and self._learn_size() <= file_offset:
                return 0
            raise _map_error(e, self.url.url) from e
        self._nbytes = int(result.meta["size"])
        n = len(data)
        if n:
            np.copyto(dst[:n], np.frombuffer(data, dtype=np.uint8))
        return n

    def _learn_size(self) -> int:
        self._nbytes = None
        return self.nbytes

    def read(self, file_offset: int, nbytes: int) -> bytes:
        """Up to `nbytes` bytes from `file_offset` (fewer at the end of the object)."""
        buf = bytearray(nbytes)
        n = self.read_into(file_offset, buf)
        del buf[n:]
        return bytes(buf)

    def read_ranges_into(
        self,
        ranges: Sequence[tuple[int, Any]],
        *,
        part_nbytes: int = DEFAULT_PART_NBYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_gap: int = 0,
    ) -> None:
        """Fill every ``(file_offset, buffer)`` of `ranges` exactly, by ranged GETs of at
        most `part_nbytes` bytes, `concurrency` of them in flight. Ranges whose bytes lie
        at most `max_gap` apart are fetched by one GET when it stays within `part_nbytes`
        (many small tensors cost few requests; the gap bytes are fetched and dropped). The GIL is released
        during the transfers and the copies. The first failure wins: no new GET starts,
        those in flight finish, then it is raised (mapped, naming the URL). A range beyond
        the object's end raises FormatError (the object is shorter than its header says)."""
        if part_nbytes <= 0 or concurrency <= 0:
            raise ValueError("part_nbytes and concurrency must be positive")
        # spans: [start, end, [(file offset, destination)]], each one GET
        spans: list[list[Any]] = []
        order = sorted(((off, _as_bytes_array(b)) for off, b in ranges), key=lambda r: r[0])
        for file_offset, dst in order:
            for start in range(0, dst.nbytes, part_nbytes):
                off, piece = file_offset + start, dst[start : start + part_nbytes]
                last = spans[-1] if spans else None
                if (
                    last is not None
                    and 0 <= off - last[1] <= max_gap
                    and off + piece.nbytes - last[0] <= part_nbytes
                ):
                    last[1] = off + piece.nbytes
                    last[2].append((off, piece))
                else:
                    spans.append([off, off + piece.nbytes, [(off, piece)]])
        if not spans:
            return
        obs = _obstore()
        store, key, url = self._store, self.url.key, self.url.url

        def fetch(span: list[Any]) -> None:
            begin, end, targets = span
            data = _call(url, obs.get_range, store, key, start=begin, length=end - begin)
            if len(data) != end - begin:
                raise FormatError(
                    f"{url}: object ends before byte {end} (got {len(data)} of "
                    f"{end - begin} bytes at offset {begin}); it is truncated or not the "
                    "object its header describes"
                )
            src = np.frombuffer(data, dtype=np.uint8)
            for off, dst in targets:
                np.copyto(dst, src[off - begin : off - begin + dst.nbytes])  # drops the GIL

        _run_all(fetch, spans, concurrency, url)


def _run_all(fn: Any, items: Sequence[Any], concurrency: int, url: str) -> None:
    """Run fn over items on a pool; first failure wins, the rest are cancelled or awaited."""
    if len(items) == 1 or concurrency == 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(concurrency, len(items)), "tensorfile-remote") as pool:
        futures: list[Future[None]] = [pool.submit(fn, item) for item in items]
        _, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in futures if f.done() and not f.cancelled() and f.exception()]
        if failed:
            for f in pending:
                f.cancel()
            wait(pending)
            exc = failed[0].exception()
            assert exc is not None
            raise exc


# --- writes ---------------------------------------------------------------------------


def _flat_views(buffers: Iterable[Any]) -> list[memoryview]:
    views = []
    for b in buffers:
        mv = memoryview(b)
        if not mv.c_contiguous:
            raise TypeError("upload buffers must be C-contiguous")
        if mv.nbytes:
            views.append(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv)
    return views


def upload(
    url: str | ObjectURL,
    buffers: Iterable[Any],
    *,
    total: int | None = None,
    part_nbytes: int = DEFAULT_PART_NBYTES,
    concurrency: int = DEFAULT_CONCURRENCY,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write the concatenation of `buffers` (bytes-like, C-contiguous; e.g. memoryviews
    of tensor memory, which must stay unchanged until this returns) as the object at
    `url`, by a multipart upload of `part_nbytes` parts (raised to fit S3's 10,000-part
    limit), `concurrency` parts in flight, read straight from the buffers without a copy.
    The GIL is released during the transfers.

    The object appears whole or not at all: the upload is completed only after every part
    succeeded, and the previous object at `url` stays readable until then. Any failure,
    including an exception (KeyboardInterrupt too) raised while the parts are produced,
    aborts the upload; obstore aborts it itself when a part fails mid-stream, and for the
    one case it does not (a failure among the last parts in flight) the upload is found
    and aborted here through `abort_incomplete_uploads` (needs botocore). Objects smaller
    than one part go up in a single PUT. With `total` (their byte count) given, `buffers`
    may be an iterator producing them as the upload consumes them; an exception it raises
    aborts the upload."""
    target = parse_url(url) if isinstance(url, str) else url
    if target.kind == "http":
        raise PermissionError(13, f"{target.url}: http(s) URLs are read-only", target.url)
    if part_nbytes < _MIN_PART_NBYTES and target.kind == "s3":
        raise ValueError(f"part_nbytes must be at least {_MIN_PART_NBYTES} bytes for S3")
    views: Iterable[memoryview]
    if total is None:
        views = _flat_views(buffers)
        total = sum(v.nbytes for v in views)
    else:
        views = (v for b in buffers for v in _flat_views([b]))
    obs = _obstore()
    store = store_for(target, storage_options)
    if total <= part_nbytes:
        views = list(views)
        payload: Any = views[0] if len(views) == 1 else b"".join(views)
        _call(target.url, obs.put, store, target.key, payload, use_multipart=False)
        return
    part_nbytes = max(part_nbytes, -(-total // _MAX_PARTS))
    started = _dt.datetime.now(_dt.timezone.utc)
    try:
        obs.put(
            store,
            target.key,
            iter(views),
            use_multipart=True,
            chunk_size=part_nbytes,
            max_concurrency=concurrency,
        )
    except BaseException as e:
        _abort_after_failure(target, storage_options, started)
        if isinstance(e, Exception) and _is_store_error(e):
            raise _map_error(e, target.url) from e
        raise


def _abort_after_failure(
    target: ObjectURL, storage_options: Mapping[str, Any] | None, started: _dt.datetime
) -> None:
    # Clock skew between us and the store: an upload of this key that the store dates up
    # to a minute before we started is taken for ours.
    try:
        abort_incomplete_uploads(
            target,
            storage_options=storage_options,
            exact_key=True,
            initiated_after=started - _dt.timedelta(seconds=60),
            older_than=None,
        )
    except Exception:
        pass  # the save's own error is what the caller needs to see


def _process_start() -> _dt.datetime:
    """When this process started (Linux: from /proc; elsewhere: when this module loaded)."""
    try:
        with open(f"/proc/{os.getpid()}/stat") as f:
            # Field 22 (starttime, clock ticks after boot); the name in field 2 may hold ")".
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith("btime"))
        return _dt.datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), _dt.timezone.utc)
    except (OSError, ValueError, IndexError, StopIteration):
        return _MODULE_LOADED


_MODULE_LOADED = _dt.datetime.now(_dt.timezone.utc)


def _boto_client(target: ObjectURL, storage_options: Mapping[str, Any] | None) -> Any:
    """A botocore S3 client with the configuration `store_for` would use: obstore offers
    no call to list or abort multipart uploads, so these two go through botocore, which
    signs them (we never sign by hand)."""
    try:
        import botocore.config
        import botocore.session
    except ImportError as e:
        raise ImportError(
            f"{target.url}: listing incomplete multipart uploads needs botocore (pip install boto3)"
        ) from e
    options = {_S3_ALIASES.get(k, k): v for k, v in (storage_options or {}).items()}
    config, provider = _s3_config(
        {k: v for k, v in options.items() if k not in _CLIENT_KEYS and k != "retry_config"}
    )
    creds: dict[str, Any] = {}
    if "access_key_id" in config:
        creds = {
            "aws_access_key_id": config["access_key_id"],
            "aws_secret_access_key": config.get("secret_access_key"),
            "aws_session_token": config.get("session_token"),
        }
    elif provider is not None:
        c = provider()
        creds = {
            "aws_access_key_id": c["access_key_id"],
            "aws_secret_access_key": c["secret_access_key"],
            "aws_session_token": c["token"],
        }
    key = (config.get("endpoint"), config.get("region"), tuple(sorted(creds.items())))
    with _stores_lock:
        client = _boto_clients.get(key)
        if client is None:  # a client costs about 0.1 s to make: one per configuration
            session = botocore.session.get_session()
            client = _boto_clients[key] = session.create_client(
                "s3",
                endpoint_url=config.get("endpoint"),
                region_name=config.get("region") or "us-east-1",
                config=botocore.config.Config(
                    connect_timeout=5,
                    read_timeout=60,
                    retries={"max_attempts": 5, "mode": "standard"},
                ),
                **creds,
            )
    return client


_boto_clients: dict[Any, Any] = {}


def abort_incomplete_uploads(
    url: str | ObjectURL,
    *,
    storage_options: Mapping[str, Any] | None = None,
    older_than: _dt.datetime | str | None = "process-start",
    initiated_after: _dt.datetime | None = None,
    exact_key: bool = False,
) -> list[str]:
    """Abort the incomplete multipart uploads under `url`'s key prefix (only of that exact
    key when `exact_key`) and return the keys aborted. Their parts stop being billed; no
    completed object is touched.

    By default only uploads initiated before this process started are aborted: leftovers
    of an earlier saver that was killed, never an upload this process has in flight. Pass
    a datetime to choose another cut-off, or None for no upper bound. Another process
    uploading under the same prefix right now (another rank of the same job) started
    before us would be aborted too: call this from the single writer of a prefix, or
    pass the job's start time. S3 only (botocore lists and aborts; obstore cannot)."""
    target = parse_url(url) if isinstance(url, str) else url
    if target.kind != "s3":
        raise NotImplementedError(f"{target.url}: listing incomplete uploads is S3-only")
    if older_than == "process-start":
        older_than = _process_start()
    assert older_than is None or isinstance(older_than, _dt.datetime)
    client = _boto_client(target, storage_options)
    aborted: list[str] = []
    try:
        kwargs: dict[str, Any] = {"Bucket": target.bucket, "Prefix": target.key}
        while True:
            page = client.list_multipart_uploads(**kwargs)
            for up in page.get("Uploads", []):
                when = up["Initiated"]
                if exact_key and up["Key"] != target.key:
                    continue
                if older_than is not None and when >= older_than:
                    continue
                if initiated_after is not None and when < initiated_after:
                    continue
                client.abort_multipart_upload(
                    Bucket=target.bucket, Key=up["Key"], UploadId=up["UploadId"]
                )
                aborted.append(up["Key"])
            if not page.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = page.get("NextKeyMarker", "")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
    except Exception as e:
        raise _map_botocore_error(e, target.url) from e
    return aborted


def _map_botocore_error(exc: BaseException, url: str) -> OSError:
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    said = f"{code}: {exc}" if code else str(exc)
    if code in ("NoSuchBucket", "NoSuchKey", "NoSuchUpload", "404"):
        return FileNotFoundError(2, f"{url}: {said}", url)
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
        return PermissionError(13, f"{url}: access denied: {said}", url)
    if any(s in code for s in _THROTTLE):
        return StoreThrottledError(f"{url}: throttled by the store after retries: {said}")
    return exc if isinstance(exc, OSError) else OSError(f"{url}: {said}")


# --- small objects and listing --------------------------------------------------------


def _target(url: str | ObjectURL) -> ObjectURL:
    return parse_url(url) if isinstance(url, str) else url


def put_bytes(
    url: str | ObjectURL, data: Any, *, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write a small object (a commit marker, an index) in one PUT: atomic on every store."""
    t = _target(url)
    if t.kind == "http":
        raise PermissionError(13, f"{t.url}: http(s) URLs are read-only", t.url)
    obs = _obstore()
    _call(t.url, obs.put, store_for(t, storage_options), t.key, data, use_multipart=False)


def get_bytes(url: str | ObjectURL, *, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """A whole small object's bytes. FileNotFoundError when it does not exist."""
    t = _target(url)
    obs = _obstore()
    result = _call(t.url, obs.get, store_for(t, storage_options), t.key)
    return bytes(_call(t.url, result.bytes))


def exists(url: str | ObjectURL, *, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether the object exists (one HEAD). A missing bucket raises FileNotFoundError
    on stores that say so; other errors raise as mapped."""
    t = _target(url)
    obs = _obstore()
    try:
        _call(t.url, obs.head, store_for(t, storage_options), t.key)
    except FileNotFoundError:
        return False
    return True


def delete(url: str | ObjectURL, *, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete the object; deleting one that does not exist is no error (S3's rule)."""
    t = _target(url)
    obs = _obstore()
    try:
        _call(t.url, obs.delete, store_for(t, storage_options), t.key)
    except FileNotFoundError:
        pass


class ObjectInfo(NamedTuple):
    """One listed object: `key` relative to the bucket, `nbytes` its length."""

    key: str
    nbytes: int
    last_modified: _dt.datetime


def list_objects(
    url: str | ObjectURL,
    *,
    recursive: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[ObjectInfo]:
    """The objects under `url` taken as a directory (its key plus "/"), sorted by key;
    with recursive=False only those directly in it. An empty list when there are none."""
    t = _target(url)
    obs = _obstore()
    store = store_for(t, storage_options)
    prefix = t.key.rstrip("/") + "/" if t.key else None
    out: list[ObjectInfo] = []

    def add(metas: Iterable[Mapping[str, Any]]) -> None:
        for m in metas:
            out.append(ObjectInfo(str(m["path"]), int(m["size"]), m["last_modified"]))

    if recursive:
        try:
            for chunk in obs.list(store, prefix):
                add(chunk)
        except Exception as e:
            raise _map_error(e, t.url) from e
    else:
        result = _call(t.url, obs.list_with_delimiter, store, prefix)
        add(result["objects"])
    out.sort(key=lambda o: o.key)
    return out
