"""Where a spec points: local paths, s3:// URIs and S3 endpoints, checked before anything runs.

Each check is a regular expression that must (or must not) be found in the value, applying only to values
in which its `when` expression is found, with the message to show. `spec/crd.py` turns the same checks into
CEL rules, so the API server refuses the same values in the same words. The expressions are both Python `re`
and RE2 (no look-around, no back-references).
"""
from __future__ import annotations

import re
from typing import NamedTuple, Optional


class Check(NamedTuple):
    pattern: str
    must_match: bool  # True: the value must contain a match; False: it must not
    message: str
    when: Optional[str] = None  # the check applies only to values in which this is found
    echo: bool = False  # the message shows the value: `'<value>': <message>`

    def fails(self, value: str) -> bool:
        if self.when is not None and not re.search(self.when, value):
            return False
        return bool(re.search(self.pattern, value)) != self.must_match


CREDENTIALS = ("credentials do not belong in a spec: put them in the Kubernetes Secret named by "
               "spec.checkpoint.credentials_secret, or in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
UNSUPPORTED_URI = "only s3:// and local paths are supported"
LOCAL_PREFIXES = ("/", "./", "../", "~")
URI_SCHEMES = ("s3://", "file://", *LOCAL_PREFIXES)
S3 = "^s3://"

# An s3:// URI is s3://BUCKET[/KEY] (https://docs.aws.amazon.com/AmazonS3/latest/userguide/bucketnamingrules.html).
S3_CHECKS = (
    Check(r"^s3://[^/]*@", False, CREDENTIALS, when=S3),
    Check(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/|$)", True,
          "expected s3://BUCKET[/KEY], where BUCKET is 3-63 lowercase letters, digits, '.' and '-', "
          "starting and ending with a letter or digit", when=S3),
    Check(r"^s3://[^/]*(\.\.|\.-|-\.)", False, "an S3 bucket name may not contain '..', '.-' or '-.'", when=S3),
    Check(r"^s3://[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+(/|$)", False, "an S3 bucket name may not be an IP address",
          when=S3),
    Check(r"^s3://[^/]+/(.*/)?/", False, "empty key segments ('//') are not allowed", when=S3),
    Check(r"^s3://[^/]+/(.*/)?\.\.?(/|$)", False, "'.' and '..' are not allowed as key segments", when=S3),
)

NOT_ROOT = Check(r"^(file://)?[/\s]*$", False, "must name a file, folder or s3:// prefix, not the filesystem root")
SUPPORTED_SCHEME = Check(
    "^(" + "|".join(re.escape(p) for p in URI_SCHEMES) + ")", True, UNSUPPORTED_URI, when="://", echo=True)

# A place to read or write: a local path or an s3:// URI.
LOCATION_CHECKS = (NOT_ROOT, SUPPORTED_SCHEME, *S3_CHECKS)

# spec.checkpoint.endpoint_url: http(s)://HOST[:PORT][/PATH], nothing that could carry a key.
ENDPOINT_CHECKS = (
    Check(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*@", False, CREDENTIALS),
    Check(r"^https?://[^/?#@\s]+(/[^?#\s]*)?$", True,
          "expected http(s)://HOST[:PORT][/PATH], without a query or fragment"),
)

MAX_URI_LENGTH = 2048


def first_failure(value: str, checks: tuple[Check, ...]) -> Optional[Check]:
    return next((check for check in checks if check.fails(value)), None)
