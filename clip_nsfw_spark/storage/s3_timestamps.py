"""Faster timestamps for botocore's S3 responses: the same datetimes, without dateutil's general parser.

botocore turns every timestamp of a response into a ``datetime`` with ``dateutil.parser.parse``: ~0.1 ms
each. A listing carries one ``LastModified`` per key and a GET one ``Last-Modified`` header, so on a
100,000-file input this parser was ~75% of the CPU a listing costs the driver (137 µs of 183 µs per key,
measured on 2026-12-06, Intel Xeon: docs/scale.md). S3 writes only two forms: ISO 8601 in UTC with a ``Z``
(XML bodies) and RFC 7231's HTTP date in GMT (headers). ``parse_s3_timestamp`` reads those two forms
directly and gives botocore's own parser everything else, returning equal datetimes (in UTC, with dateutil's
``tzutc``; botocore's own may carry ``tzlocal`` on a machine whose zone is UTC: the same instant, printed the
same). Nothing in s3fs or the job depends on the tzinfo's type (a file's identity uses its ETag first).
"""

from __future__ import annotations

import datetime
import re

try:  # s3fs's dependency (botocore's); botocore itself is imported where S3 is used (s3_listing.py says why)
    from dateutil.tz import tzutc
except ImportError:  # pragma: no cover - the core install has no s3fs
    tzutc = None

# Exactly S3's two forms; anything else (offsets, 7+ fraction digits, epoch numbers …) goes to botocore's parser.
_ISO_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?Z\Z")
_HTTP_DATE = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), (\d\d) (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                        r"(\d{4}) (\d\d):(\d\d):(\d\d) GMT\Z")
_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


def parse_s3_timestamp(value):
    """botocore's ``parse_timestamp(value)``, read directly for S3's ISO-UTC and HTTP-date strings.

    Returns a timezone-aware ``datetime`` equal to botocore's result, in UTC; raises
    what botocore raises for what it refuses (a day 31 of February included: ``datetime`` refuses it, and then
    botocore's parser is asked, which says why)."""
    if isinstance(value, str):
        iso = _ISO_UTC.match(value)
        try:
            if iso:
                year, month, day, hour, minute, second, fraction = iso.groups()
                return datetime.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                                         int((fraction or "0").ljust(6, "0")), tzinfo=tzutc())
            http = _HTTP_DATE.match(value)
            if http and int(http.group(3)) >= 100:  # dateutil reads years 0001-0099 as 19xx/20xx: botocore decides
                day, month, year, hour, minute, second = http.groups()
                return datetime.datetime(int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second),
                                         tzinfo=tzutc())
        except ValueError:  # an impossible date: botocore's parser decides (and words the error)
            pass
    from botocore.utils import parse_timestamp

    return parse_timestamp(value)


def use_fast_s3_timestamps() -> None:
    """Make ``parse_s3_timestamp`` botocore's default timestamp parser in this process (idempotent).

    botocore reads ``botocore.parsers.DEFAULT_TIMESTAMP_PARSER`` each time it builds a response parser, i.e.
    for every response of every client, s3fs's included; a parser a caller chose explicitly is left alone.
    Without botocore (no s3fs installed) nothing is done."""
    try:
        import botocore.parsers
        from botocore.utils import parse_timestamp
    except ImportError:  # pragma: no cover - the core install has no s3fs
        return
    if botocore.parsers.DEFAULT_TIMESTAMP_PARSER is parse_timestamp:
        botocore.parsers.DEFAULT_TIMESTAMP_PARSER = parse_s3_timestamp
