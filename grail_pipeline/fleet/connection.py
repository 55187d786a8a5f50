"""The fleet's Redis: `GRAIL_REDIS_URL` read and checked, and a client that fails fast.

Unset means one worker alone, with no server (the embedded default). Set, the server must answer a PING at
start: a wrong URL, a refused connection or a bad password is one UserError line before any model loads.
The client's own retries are off (redis-py 6+ retries three times with up to 10 s of back-off by default):
`retry.RedisGuard` is the one place that retries, so an outage is noticed, logged once and shown in the
status instead of stalling a call for tens of seconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from grail_pipeline.common.errors import UserError

ENV_REDIS_URL = "GRAIL_REDIS_URL"
SCHEMES = ("redis", "rediss", "unix")
MIN_SERVER = (6, 2)  # the scripts read the server clock (TIME) and use ZADD/ZRANGE forms of 6.2
DEFAULT_TIMEOUT_S = 2.0


def redacted(url: str) -> str:
    """`url` with any password replaced by `***`, for log lines and errors (a URL too broken to parse: all of it
    after the scheme, which may hold one)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        scheme, sep, _ = url.partition("://")
        return f"{scheme}{sep}***" if sep else "***"
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def redis_url_from_env(env: Mapping[str, str] = os.environ) -> str | None:
    """`GRAIL_REDIS_URL`, checked for its form (no connection yet): the one rule for a Redis URL, whoever gives it.
    None when unset or empty."""
    url = env.get(ENV_REDIS_URL, "").strip()
    if not url:
        return None
    shown = f"{ENV_REDIS_URL}={redacted(url)!r}"
    try:
        parts = urlsplit(url)
        port = parts.port  # parsed on access: out of range or not a number raises here
        host = parts.hostname
    except ValueError as exc:  # a bracketed IPv6 host left open, a port of 99999 or 'abc'
        raise UserError(f"{shown} is not a Redis URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise UserError(f"{shown} is not a Redis URL: it must start with " + ", ".join(f"{s}://" for s in SCHEMES))
    if parts.scheme != "unix" and not host:
        raise UserError(f"{shown} names no host (e.g. redis://127.0.0.1:6379/0)")
    if port == 0:
        raise UserError(f"{shown} has port 0: a Redis server listens on a port from 1 to 65535")
    return url


def connect(url: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> redis.Redis:
    """A client for `url` whose server answered a PING and is new enough; else one UserError line.

    `timeout_s` bounds every socket operation, so a server that vanishes mid-call surfaces as a
    ConnectionError or TimeoutError within that time, for `RedisGuard` to handle.
    """
    shown = redacted(url)
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                      retry=Retry(NoBackoff(), 0))
    except ValueError as exc:
        raise UserError(f"{ENV_REDIS_URL}={shown!r} is not a Redis URL: {exc}") from None
    try:
        client.ping()
        version = str(client.info("server").get("redis_version", "0"))
    except redis.AuthenticationError as exc:
        raise UserError(f"Redis at {shown} refused the credentials: {exc}") from None
    except redis.ConnectionError as exc:
        if "closed by server" in str(exc):  # something listens there, and it is not Redis (an HTTP server, say)
            raise UserError(f"the server at {shown} closed the connection without answering as Redis does; is that "
                            f"the Redis port?") from None
        raise UserError(f"Redis at {shown} is unreachable ({exc}); start it, or unset {ENV_REDIS_URL} "
                        f"to mine with one worker alone") from None
    except (redis.TimeoutError, OSError) as exc:
        raise UserError(f"Redis at {shown} is unreachable ({exc}); start it, or unset {ENV_REDIS_URL} "
                        f"to mine with one worker alone") from None
    except redis.ResponseError as exc:
        raise UserError(f"Redis at {shown} refused a PING: {exc}") from None
    except Exception as exc:  # an HTTP server, or anything else talking: redis-py fails in ways of its own
        raise UserError(f"the server at {shown} does not answer as Redis does ({type(exc).__name__}: "
                        f"{str(exc)[:80]}); is that the Redis port?") from None
    numbers = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if numbers < MIN_SERVER:
        raise UserError(f"Redis at {shown} is version {version}; the fleet needs "
                        f"{'.'.join(map(str, MIN_SERVER))} or newer")
    return client
