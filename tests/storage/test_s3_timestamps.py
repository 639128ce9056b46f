"""storage/s3_timestamps.py: S3's timestamps read without dateutil, to the same objects botocore makes."""

import datetime
import email.utils
import random

import botocore.parsers
import botocore.utils
import pytest

from clip_nsfw_spark.storage.filesystem import filesystem
from clip_nsfw_spark.storage.s3_timestamps import parse_s3_timestamp, use_fast_s3_timestamps


def _same(value) -> None:
    """parse_s3_timestamp(value) is botocore's result: equal, same text, same offset. (botocore's tzinfo is
    dateutil's tzutc, or tzlocal on a machine whose zone is UTC for some far dates: the same instant.)"""
    ours, theirs = parse_s3_timestamp(value), botocore.utils.parse_timestamp(value)
    assert ours == theirs, value
    assert (ours.tzinfo is None) == (theirs.tzinfo is None), value
    assert (ours.isoformat(), ours.utcoffset(), ours.tzname()) == (theirs.isoformat(), theirs.utcoffset(),
                                                                 theirs.tzname()), value


def _random_instants(count: int):
    rng = random.Random(20261206)
    start = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    for _ in range(count):
        yield start + datetime.timedelta(seconds=rng.randrange(0, 200 * 365 * 86400), microseconds=rng.randrange(10**6))


def test_s3s_iso_form_in_listings_parses_as_botocore_does():
    for instant in _random_instants(2000):
        _same(instant.strftime("%Y-%m-%dT%H:%M:%SZ"))  # no fraction
        _same(instant.strftime("%Y-%m-%dT%H:%M:%S.") + f"{instant.microsecond // 1000:03d}Z")  # S3's own: ms
        _same(instant.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))  # µs
        _same(instant.strftime("%Y-%m-%dT%H:%M:%S.") + f"{instant.microsecond:06d}"[:1] + "Z")  # one digit


def test_http_dates_in_headers_parse_as_botocore_does():
    for instant in _random_instants(2000):  # every weekday and month name, each year's days
        _same(email.utils.format_datetime(instant, usegmt=True))


@pytest.mark.parametrize("value", [
    "2026-12-06T06:00:00.123456789Z",  # nanoseconds: botocore's parser decides
    "2026-12-06T06:00:00+01:00",  # an offset
    "2026-12-06T06:00:00",  # no zone
    "2026-12-06 06:00:00Z",
    "Sun, 06 Dec 2026 06:00:00 +0000",
    "Sunday, 06-Dec-26 06:00:00 GMT",  # RFC 850
    "Fri, 01 Jan 0099 00:00:00 GMT",  # dateutil reads a year below 100 as 19xx/20xx: so must we
    "Mon, 01 Jan 0001 00:00:00 GMT",
    "1765000000",  # epoch seconds as text
    1765000000,
    1765000000.5,
])
def test_other_forms_are_left_to_botocore(value):
    _same(value)


@pytest.mark.parametrize("value", ["2026-02-31T00:00:00Z", "Tue, 31 Feb 2026 00:00:00 GMT", "not a date",
                                   "2026-13-01T00:00:00.000Z"])
def test_impossible_dates_fail_as_in_botocore(value):
    try:
        expected = botocore.utils.parse_timestamp(value)
    except Exception as err:  # noqa: BLE001 - whatever botocore raises, ours raises too
        with pytest.raises(type(err)):
            parse_s3_timestamp(value)
    else:
        assert parse_s3_timestamp(value) == expected


def test_opening_s3_makes_it_botocores_default_once(s3_server, monkeypatch):
    monkeypatch.setattr(botocore.parsers, "DEFAULT_TIMESTAMP_PARSER", botocore.utils.parse_timestamp)
    filesystem("/tmp")  # a local path leaves botocore alone
    assert botocore.parsers.DEFAULT_TIMESTAMP_PARSER is botocore.utils.parse_timestamp
    filesystem("s3://anything", s3_server.storage_options())
    assert botocore.parsers.DEFAULT_TIMESTAMP_PARSER is parse_s3_timestamp
    chosen = object()  # a parser someone else chose is not replaced
    monkeypatch.setattr(botocore.parsers, "DEFAULT_TIMESTAMP_PARSER", chosen)
    use_fast_s3_timestamps()
    assert botocore.parsers.DEFAULT_TIMESTAMP_PARSER is chosen


def test_a_real_listing_and_head_are_the_same_with_either_parser(s3_server, monkeypatch):
    fs = s3_server.filesystem()
    fs.mkdir("timestamps")
    fs.pipe({f"timestamps/dir/file-{i}": b"x" * i for i in range(5)})

    def read():
        fs.invalidate_cache()
        listed = fs.find("timestamps", detail=True)
        heads = {path: fs.info(path) for path in listed}
        return listed, heads

    monkeypatch.setattr(botocore.parsers, "DEFAULT_TIMESTAMP_PARSER", botocore.utils.parse_timestamp)
    before = read()
    monkeypatch.setattr(botocore.parsers, "DEFAULT_TIMESTAMP_PARSER", parse_s3_timestamp)
    after = read()
    assert before == after
    assert all(isinstance(info["LastModified"], datetime.datetime) for info in after[0].values())
    assert len(after[0]) == 5


def test_s3s_two_forms_never_reach_dateutil(monkeypatch):
    """The point of the module: S3's forms are read without botocore's (dateutil's) parser."""
    import botocore.utils

    def refuse(value):
        raise AssertionError(f"botocore's parser asked for {value!r}")

    monkeypatch.setattr(botocore.utils, "parse_timestamp", refuse)  # where the module finds it, when it must
    assert parse_s3_timestamp("2026-12-06T06:00:00.000Z").utcoffset() == datetime.timedelta(0)
    assert parse_s3_timestamp("Sun, 06 Dec 2026 06:00:00 GMT") == datetime.datetime(
        2026, 12, 6, 6, tzinfo=datetime.timezone.utc)
    with pytest.raises(AssertionError, match="botocore's parser asked"):
        parse_s3_timestamp("2026-12-06T06:00:00+01:00")
