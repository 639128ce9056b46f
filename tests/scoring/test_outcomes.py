"""outcomes.py: the one enumeration of output streams and reject reasons, and the reason-column text."""

import json

import pyarrow as pa

from clip_nsfw_spark.driver.config import MODES
from clip_nsfw_spark.scoring.outcomes import MODE_STREAMS, Problem, Reason, Stream


def test_members_format_compare_and_serialise_as_their_value():
    for member in list(Stream) + list(Reason):
        assert str(member) == f"{member}" == "{}".format(member) == member.value
        assert member == member.value and hash(member) == hash(member.value)  # dict keys interchange with strings
        assert json.dumps(member) == json.dumps(member.value)
    assert f"[{Stream.SAFE:>6}]" == "[  safe]"  # format specs apply to the value, not to "Stream.SAFE"
    assert json.dumps({Stream.REJECTED: {Reason.NULL_EMBEDDING: 2}}) == '{"rejected": {"null embedding": 2}}'
    assert {"rejected": 1}[Stream.REJECTED] == 1
    assert pa.array([Reason.WRONG_LENGTH, Stream.KEPT]).to_pylist() == ["wrong length", "kept"]


def test_values_are_distinct_and_reasons_hold_no_separator():
    assert len({s.value for s in Stream}) == len(Stream) and len({r.value for r in Reason}) == len(Reason)
    # The reason column is "<reason>" or "<reason>: <detail>", and "<column>: …; <column>: …" with several
    # embedding columns: a reason holding ":" or ";" could not be told from its detail or from the next column.
    assert [r for r in Reason if ":" in r.value or ";" in r.value] == []


def test_problem_is_its_text_and_carries_its_reason():
    plain = Problem(Reason.NULL_EMBEDDING)
    detailed = Problem(Reason.WRONG_LENGTH, "expected 768, found 512")
    assert plain == "null embedding" and plain.reason is Reason.NULL_EMBEDDING
    assert detailed == "wrong length: expected 768, found 512" and detailed.reason is Reason.WRONG_LENGTH
    assert isinstance(detailed, str) and str(detailed) == "wrong length: expected 768, found 512"
    assert json.dumps([detailed]) == '["wrong length: expected 768, found 512"]'
    assert pa.array([detailed, None], pa.string()).to_pylist() == ["wrong length: expected 768, found 512", None]
    # The category is carried, never parsed back out of the text.
    assert Problem(Reason.NON_FINITE, "score: 1").reason is Reason.NON_FINITE


def test_every_mode_has_its_streams_and_every_stream_a_mode():
    assert set(MODE_STREAMS) == set(MODES)
    assert {stream for streams in MODE_STREAMS.values() for stream in streams} == set(Stream)
    assert all(len(set(streams)) == len(streams) for streams in MODE_STREAMS.values())
    # Rows that cannot be scored have a file of their own exactly where the main streams hold only scored rows.
    assert {mode for mode, streams in MODE_STREAMS.items() if Stream.REJECTED in streams} == {"filter", "split"}
    assert MODE_STREAMS["split"][:2] == (Stream.SAFE, Stream.UNSAFE)
