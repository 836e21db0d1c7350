"""AWS Signature Version 4 request signing (header form), written from the AWS spec.

Pure: no clock reads, no IO. The caller passes the signing instant (`now`, timezone-aware or
naive UTC) and sends exactly the URL, headers and body it signed.

Algorithm (https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html):

    CanonicalRequest = Method \\n CanonicalURI \\n CanonicalQuery \\n CanonicalHeaders \\n
                       SignedHeaders \\n hex(sha256(payload))
    StringToSign     = "AWS4-HMAC-SHA256" \\n AmzDate \\n Scope \\n hex(sha256(CanonicalRequest))
    Scope            = YYYYMMDD/region/service/aws4_request
    SigningKey       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, YYYYMMDD), region), service), "aws4_request")
    Signature        = hex(HMAC(SigningKey, StringToSign))

The canonical URI is the path *as sent on the wire* URI-encoded once more (every byte except the
unreserved `A-Za-z0-9-_.~` and `/`). For a path whose segments were already percent-encoded
(Bedrock model ARNs: `arn%3Aaws...`) that is the "encode twice" rule of non-S3 services, and for
a raw path it is the test suite's single encoding. Dot segments are not normalized: callers must
not send `.`/`..` segments.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, unquote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_SPACES = re.compile(r"\s+")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True, repr=False)
class AwsCredentials:
    """Static AWS credentials. `repr` shows only the access key id, never the secrets."""

    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    @classmethod
    def parse(cls, value: str) -> AwsCredentials:
        """`ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]` (how a Bedrock provider stores them
        in its single encrypted key). Raises ValueError, without echoing the value."""
        parts = value.strip().split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError("AWS credentials must look like ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN].")
        token = parts[2] if len(parts) == 3 and parts[2] else None
        return cls(parts[0], parts[1], token)

    def __repr__(self) -> str:
        return f"AwsCredentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"


def uri_encode(value: str, *, keep_slash: bool = False) -> str:
    """RFC 3986 percent-encoding of UTF-8 bytes, leaving only unreserved characters (and `/`
    when `keep_slash`) as they are; hex digits are upper case."""
    return quote(value, safe="/~" if keep_slash else "~")


def canonical_uri(path: str) -> str:
    return uri_encode(path or "/", keep_slash=True)


def canonical_query(query: str) -> str:
    """Pairs decoded, re-encoded strictly, sorted by key then value; `a` means `a=`."""
    pairs: list[tuple[str, str]] = []
    for part in query.split("&"):
        if not part:
            continue
        key, _, val = part.partition("=")
        pairs.append((uri_encode(unquote(key)), uri_encode(unquote(val))))
    pairs.sort()
    return "&".join(f"{k}={v}" for k, v in pairs)


def canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    """(`name:value\\n` lines, `;`-joined signed header names): names lower-cased and sorted,
    values trimmed with inner whitespace runs collapsed. Every given header is signed."""
    folded: dict[str, str] = {}
    for name, value in headers.items():
        key = name.strip().lower()
        val = _SPACES.sub(" ", value.strip())
        folded[key] = f"{folded[key]},{val}" if key in folded else val
    names = sorted(folded)
    return "".join(f"{n}:{folded[n]}\n" for n in names), ";".join(names)


def canonical_request(method: str, url: str, headers: Mapping[str, str], payload_hash: str) -> tuple[str, str]:
    """(canonical request, signed headers) for `url` exactly as it will be sent."""
    parts = urlsplit(url)
    lines, signed = canonical_headers(headers)
    text = "\n".join(
        [method.upper(), canonical_uri(parts.path), canonical_query(parts.query), lines, signed, payload_hash]
    )
    return text, signed


def credential_scope(datestamp: str, region: str, service: str) -> str:
    return f"{datestamp}/{region}/{service}/aws4_request"


def string_to_sign(amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signing_key(secret_access_key: str, datestamp: str, region: str, service: str) -> bytes:
    k_date = _hmac(("AWS4" + secret_access_key).encode(), datestamp)
    return _hmac(_hmac(_hmac(k_date, region), service), "aws4_request")


def host_header(url: str) -> str:
    """The `Host` value an HTTP client sends for `url` (port only when not the default)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port is not None and parts.port != _DEFAULT_PORTS.get(parts.scheme.lower()):
        host = f"{host}:{parts.port}"
    return host


def amz_date(now: datetime) -> str:
    """`YYYYMMDDTHHMMSSZ` in UTC; a naive `now` is taken as UTC."""
    utc = now.astimezone(UTC) if now.tzinfo is not None else now
    return utc.strftime("%Y%m%dT%H%M%SZ")


def sign_request(
    *,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    credentials: AwsCredentials,
    region: str,
    service: str,
    now: datetime,
    content_sha256_header: bool = True,
) -> dict[str, str]:
    """The headers to send with the request: `headers` plus `Host` (derived from `url` when
    absent), `X-Amz-Date`, `X-Amz-Content-SHA256` (unless disabled), `X-Amz-Security-Token`
    (with a session token) and `Authorization`. All of them, including every given header,
    are signed, so the caller must send them unchanged. Deterministic for equal inputs."""
    out = dict(headers)
    if not any(k.lower() == "host" for k in out):
        out["Host"] = host_header(url)
    date = amz_date(now)
    payload_hash = hashlib.sha256(body).hexdigest()
    out["X-Amz-Date"] = date
    if content_sha256_header:
        out["X-Amz-Content-SHA256"] = payload_hash
    if credentials.session_token:
        out["X-Amz-Security-Token"] = credentials.session_token
    canonical, signed = canonical_request(method, url, out, payload_hash)
    scope = credential_scope(date[:8], region, service)
    key = signing_key(credentials.secret_access_key, date[:8], region, service)
    signature = hmac.new(key, string_to_sign(date, scope, canonical).encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{ALGORITHM} Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed}, Signature={signature}"
    )
    return out


_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<akid>[^/\s,]+)/(?P<date>\d{8})/(?P<region>[^/\s,]+)/(?P<service>[^/\s,]+)"
    r"/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;\-]+), ?Signature=(?P<sig>[0-9a-f]{64})$"
)


@dataclass(frozen=True, slots=True)
class ParsedAuthorization:
    access_key_id: str
    datestamp: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(value: str) -> ParsedAuthorization | None:
    """Split a SigV4 `Authorization` header into its parts; None when it is not that shape."""
    m = _AUTH_RE.match(value.strip())
    if m is None:
        return None
    return ParsedAuthorization(
        m["akid"], m["date"], m["region"], m["service"], tuple(m["signed"].split(";")), m["sig"]
    )
