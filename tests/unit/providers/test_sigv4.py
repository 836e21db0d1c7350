"""dataplane/providers/aws_sigv4.py against AWS's published SigV4 vectors and an independent,
step-by-step computation of the documented algorithm."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane.providers.aws_sigv4 import (
    AwsCredentials,
    canonical_headers,
    canonical_query,
    canonical_request,
    credential_scope,
    host_header,
    parse_authorization,
    sign_request,
    signing_key,
    string_to_sign,
)

# The example credentials and instant of the AWS SigV4 test suite (not anybody's keys).
SUITE = AwsCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
SUITE_NOW = datetime(2015, 8, 30, 12, 36, 0, tzinfo=UTC)
SCOPE = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "


def suite_sign(method: str, url: str, **headers: str) -> str:
    out = sign_request(method=method, url=url, headers={"Host": "example.amazonaws.com", **headers}, body=b"",
                       credentials=SUITE, region="us-east-1", service="service", now=SUITE_NOW,
                       content_sha256_header=False)
    return out["Authorization"]


@pytest.mark.parametrize(("name", "method", "url", "signature"), [
    ("get-vanilla", "GET", "https://example.amazonaws.com/",
     "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
    ("post-vanilla", "POST", "https://example.amazonaws.com/",
     "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"),
    ("get-vanilla-query-order-key-case", "GET", "https://example.amazonaws.com/?Param2=value2&Param1=value1",
     "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"),
    ("get-utf8", "GET", "https://example.amazonaws.com/\u1234",
     "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85"),
])
def test_aws_test_suite_vectors(name: str, method: str, url: str, signature: str) -> None:
    assert suite_sign(method, url) == SCOPE + f"SignedHeaders=host;x-amz-date, Signature={signature}", name


def test_get_vanilla_intermediate_strings() -> None:
    canonical, signed = canonical_request(
        "GET", "https://example.amazonaws.com/",
        {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z"}, hashlib.sha256(b"").hexdigest())
    assert signed == "host;x-amz-date"
    assert canonical == (
        "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\n"
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    assert string_to_sign("20150830T123600Z", credential_scope("20150830", "us-east-1", "service"), canonical) == (
        "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
        "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
    )


def test_iam_list_users_documentation_example() -> None:
    out = sign_request(method="GET", url="https://iam.amazonaws.com/?Action=ListUsers&Version=2010-05-08",
                       headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}, body=b"",
                       credentials=SUITE, region="us-east-1", service="iam", now=SUITE_NOW,
                       content_sha256_header=False)
    assert out["Host"] == "iam.amazonaws.com"
    assert out["X-Amz-Date"] == "20150830T123600Z"
    assert out["Authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
    )


def test_signing_key_documentation_example() -> None:
    key = signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


def test_bedrock_request_matches_a_hand_computed_signature() -> None:
    """A Converse call with an inference-profile ARN and a session token, computed here step by
    step from the documented algorithm, with the double-encoded canonical URI written out."""
    creds = AwsCredentials("AKIAEXAMPLEKEY000001", "secret/Example+Key0000000000000000000000", "FwoGZXIvYXdzEXAMPLE==")
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    url = ("https://bedrock-runtime.eu-west-1.amazonaws.com/model/"
           "arn%3Aaws%3Abedrock%3Aeu-west-1%3A123456789012%3Ainference-profile%2Feu.anthropic.claude/converse")
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    out = sign_request(method="POST", url=url, headers={"Content-Type": "application/json"}, body=body,
                       credentials=creds, region="eu-west-1", service="bedrock", now=now)

    body_hash = hashlib.sha256(body).hexdigest()
    canonical = "\n".join([
        "POST",
        "/model/arn%253Aaws%253Abedrock%253Aeu-west-1%253A123456789012%253Ainference-profile"
        "%252Feu.anthropic.claude/converse",
        "",
        "content-type:application/json",
        "host:bedrock-runtime.eu-west-1.amazonaws.com",
        f"x-amz-content-sha256:{body_hash}",
        "x-amz-date:20260304T050607Z",
        "x-amz-security-token:FwoGZXIvYXdzEXAMPLE==",
        "",
        "content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token",
        body_hash,
    ])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", "20260304T050607Z", "20260304/eu-west-1/bedrock/aws4_request",
                         hashlib.sha256(canonical.encode()).hexdigest()])

    def h(key: bytes, msg: str) -> bytes:
        return hmac.new(key, msg.encode(), hashlib.sha256).digest()

    key = h(h(h(h(b"AWS4" + creds.secret_access_key.encode(), "20260304"), "eu-west-1"), "bedrock"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()

    assert out == {
        "Content-Type": "application/json",
        "Host": "bedrock-runtime.eu-west-1.amazonaws.com",
        "X-Amz-Date": "20260304T050607Z",
        "X-Amz-Content-SHA256": body_hash,
        "X-Amz-Security-Token": "FwoGZXIvYXdzEXAMPLE==",
        "Authorization": (
            "AWS4-HMAC-SHA256 Credential=AKIAEXAMPLEKEY000001/20260304/eu-west-1/bedrock/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-security-token, "
            f"Signature={signature}"
        ),
    }
    parsed = parse_authorization(out["Authorization"])
    assert parsed is not None
    assert (parsed.access_key_id, parsed.region, parsed.service, parsed.signature) == (
        "AKIAEXAMPLEKEY000001", "eu-west-1", "bedrock", signature)


@given(st.binary(max_size=64), st.integers(min_value=0, max_value=10**6))
def test_signature_depends_on_body_and_time(body: bytes, seconds: int) -> None:
    def sig(b: bytes, t: datetime) -> str:
        return sign_request(method="POST", url="https://h.example/x", headers={}, body=b, credentials=SUITE,
                            region="us-east-1", service="bedrock", now=t)["Authorization"]

    t = SUITE_NOW + timedelta(seconds=seconds)
    assert sig(body, t) == sig(body, t)
    assert sig(body, t) != sig(body + b"!", t)
    assert sig(body, t) != sig(body, t + timedelta(seconds=1))


def test_non_utc_and_naive_times_sign_as_utc() -> None:
    aware = SUITE_NOW.astimezone(timezone(timedelta(hours=5)))
    assert suite_sign("GET", "https://example.amazonaws.com/") == sign_request(
        method="GET", url="https://example.amazonaws.com/", headers={}, body=b"", credentials=SUITE,
        region="us-east-1", service="service", now=aware, content_sha256_header=False)["Authorization"]
    naive = sign_request(method="GET", url="https://example.amazonaws.com/", headers={}, body=b"",
                         credentials=SUITE, region="us-east-1", service="service",
                         now=SUITE_NOW.replace(tzinfo=None), content_sha256_header=False)
    assert naive["X-Amz-Date"] == "20150830T123600Z"


def test_canonical_helpers() -> None:
    assert canonical_headers({"My-Header1": "  a   b  c ", "host": "h"}) == ("host:h\nmy-header1:a b c\n",
                                                                             "host;my-header1")
    assert canonical_query("b=2&a=%20x&a=1&c") == "a=%20x&a=1&b=2&c="
    assert canonical_query("k=a+b*~") == "k=a%2Bb%2A~"
    assert host_header("http://127.0.0.1:8080/x") == "127.0.0.1:8080"
    assert host_header("https://Example.COM:443/x") == "example.com"
    assert host_header("http://[::1]:9000/") == "[::1]:9000"


def test_credentials_parse_and_never_show_secrets() -> None:
    assert AwsCredentials.parse("AKID:SECRET") == AwsCredentials("AKID", "SECRET", None)
    assert AwsCredentials.parse("AKID:SECRET:TOKEN") == AwsCredentials("AKID", "SECRET", "TOKEN")
    assert AwsCredentials.parse("AKID:SECRET:") == AwsCredentials("AKID", "SECRET", None)
    creds = AwsCredentials("AKID", "TOPSECRETVALUE", "SESSIONTOKENVALUE")
    assert "TOPSECRETVALUE" not in repr(creds) and "SESSIONTOKENVALUE" not in repr(creds)
    for bad in ("", "nocolon", ":secret", "akid:"):
        with pytest.raises(ValueError) as info:
            AwsCredentials.parse(bad)
        assert bad not in str(info.value) or not bad


def test_parse_authorization_rejects_other_shapes() -> None:
    assert parse_authorization("Bearer abc") is None
    assert parse_authorization("AWS4-HMAC-SHA256 Credential=AKID/2015/us-east-1/s/aws4_request") is None
