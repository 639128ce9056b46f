"""storage/filesystem.py: one spelling per location (canonical, locations), containment (within), join and unstrip.

Local paths on a real filesystem in tmp_path (symlinks included); object-store keys are normalised without
any server (s3fs makes no request until it is used). No Spark, no model.
"""

import os
from pathlib import Path

import fsspec
import pytest

from clip_nsfw_spark.errors import ConfigError
from clip_nsfw_spark.storage.filesystem import canonical, is_local, join, location, locations, unstrip, within


@pytest.fixture
def root(tmp_path):
    """tmp_path in its canonical spelling, with in/sub/ and a symlink link → in."""
    base = Path(os.path.realpath(tmp_path))
    (base / "in" / "sub").mkdir(parents=True)
    (base / "link").symlink_to(base / "in", target_is_directory=True)
    return base


@pytest.mark.parametrize("spelling", [
    "{r}/in", "{r}/in/", "{r}//in//", "{r}/./in/.", "{r}/in/sub/..", "{r}/other/../in", "file://{r}/in",
    "file://{r}//in/", "{r}/link", "{r}/link/", "{r}/link/sub/..",
])
def test_every_spelling_of_one_folder_is_one_canonical_path(root, spelling):
    fs, path = canonical(spelling.format(r=root))
    assert is_local(fs)
    assert path == str(root / "in")


def test_relative_and_home_paths_become_absolute(root, monkeypatch):
    monkeypatch.chdir(root / "in")
    assert canonical("sub")[1] == str(root / "in" / "sub")
    assert canonical("./sub/../../in")[1] == str(root / "in")
    assert canonical("../link/sub")[1] == str(root / "in" / "sub")
    monkeypatch.setenv("HOME", str(root))
    assert canonical("~/link")[1] == str(root / "in")


def test_dot_dot_after_a_symlink_goes_up_from_its_target(root):
    (root / "deep" / "a").mkdir(parents=True)
    (root / "in" / "to_a").symlink_to(root / "deep" / "a", target_is_directory=True)
    # The kernel resolves to_a first, so to_a/.. is deep/, not in/ (a string normpath would say in/).
    assert canonical(str(root / "in" / "to_a" / ".."))[1] == str(root / "deep")


def test_a_path_not_created_yet_resolves_its_existing_parent(root):
    assert canonical(str(root / "link" / "new" / "out"))[1] == str(root / "in" / "new" / "out")


def test_glob_base_is_the_folder_above_the_first_glob_part(root):
    assert canonical(str(root / "in" / "*.parquet"), glob_base=True)[1] == str(root / "in")
    assert canonical(str(root / "link" / "sub" / "part-[0-9]" / "x"), glob_base=True)[1] == str(root / "in" / "sub")
    assert canonical(str(root / "in" / "*.parquet"))[1] == str(root / "in" / "*.parquet")  # only when asked
    literal = root / "in" / "data[1]"
    literal.mkdir()  # a folder that exists is taken literally, glob characters and all
    assert canonical(str(literal), glob_base=True)[1] == str(literal)


def test_object_store_keys_are_normalised_and_never_leave_the_bucket():
    options = {"anon": True}
    assert canonical("s3://bucket//in/./a/../b/", options)[1] == "bucket/in/b"
    assert canonical("s3://bucket/../../in", options)[1] == "bucket/in"
    assert canonical("s3://bucket/", options)[1] == "bucket"
    fs, path = canonical("s3://bucket//in/", options)
    assert not is_local(fs) and unstrip(fs, path) == "s3://bucket/in"


def test_an_unknown_protocol_is_a_config_error_naming_the_url():
    with pytest.raises(ConfigError, match=r"cannot use foo://x: .*foo.* Use a local path, file://, s3://"):
        canonical("foo://x")


def test_locations_add_where_a_symlink_itself_sits(root):
    fs, paths = locations(str(root / "link"))
    assert paths == [str(root / "in"), str(root / "link")]
    assert locations(str(root / "link") + "/")[1] == [str(root / "in"), str(root / "link")]
    assert locations(str(root / "in"))[1] == [str(root / "in")]
    assert locations(str(root / "link") + "/.")[1] == [str(root / "in")]  # "." names the target, not the link
    # The link's parent is resolved, its name kept: a link reached through another link.
    (root / "in" / "inner").symlink_to(root / "in" / "sub", target_is_directory=True)
    assert locations(str(root / "link" / "inner"))[1] == [str(root / "in" / "sub"), str(root / "in" / "inner")]
    assert locations(str(root / "link" / "*.parquet"), glob_base=True)[1] == [str(root / "in"), str(root / "link")]


def test_within_compares_whole_path_parts(root):
    local = fsspec.filesystem("file")
    inside = str(root / "in")
    assert within(local, inside, local, inside)
    assert within(local, str(root / "in" / "sub"), local, inside)
    assert within(local, str(root / "in" / "sub" / "not-yet"), local, inside)
    assert not within(local, inside, local, str(root / "in" / "sub"))  # the outer is not under the inner
    (root / "in2").mkdir()
    assert not within(local, str(root / "in2"), local, inside)  # "in2" starts with "in" but is not under it
    assert within(local, inside, local, "/")  # the root of a filesystem holds everything on it


def test_within_knows_a_folder_by_identity_under_another_spelling(root):
    local = fsspec.filesystem("file")
    # link is in/ under another name (as a bind mount or a case-insensitive disk would give): the strings differ.
    assert within(local, str(root / "in" / "sub" / "x"), local, str(root / "link"))
    assert not within(local, str(root / "in"), local, str(root / "link" / "sub"))


def test_within_never_mixes_stores():
    local, memory = fsspec.filesystem("file"), fsspec.filesystem("memory")
    assert location(local, "/b/x/") == "file:///b/x"
    assert location(memory, "/b/x") == "memory:///b/x"
    assert not within(memory, "/b/x", local, "/b")
    assert not within(local, "/b/x", memory, "/b")
    assert within(memory, "/b/x", memory, "/b")


def test_join_skips_empty_parts_and_unstrip_gives_a_url_for_messages(root):
    assert join("bucket", "", "a", "b.parquet") == "bucket/a/b.parquet"
    assert join("bucket", "") == "bucket"
    assert join("/x", "y/") == "/x/y/"
    local = fsspec.filesystem("file")
    assert unstrip(local, str(root / "in")) == str(root / "in")  # a local path stays a path
    assert unstrip(fsspec.filesystem("memory"), "/b/x") == "memory:///b/x"


def test_hdfs_paths_are_absolute_and_their_location_names_the_namenode():
    # WebHDFS (and hdfs://) paths are POSIX paths on one NameNode: normalised like a local path (never a
    # bucket/key), and the NameNode is part of both the location compared and the URL executors open
    from clip_nsfw_spark.storage.filesystem import canonical, location, unstrip

    fs, path = canonical("webhdfs://nn.example:9870//data/./in/../out/", {"user": "alice"})
    assert path == "/data/out"
    assert location(fs, path) == "webhdfs://nn.example:9870/data/out"
    assert unstrip(fs, path) == "webhdfs://nn.example:9870/data/out"
    other, same = canonical("webhdfs://other:9870/data/out")
    assert location(other, same) != location(fs, path)  # two NameNodes are two places
    assert canonical("webhdfs://nn.example:9870/")[1] == "/"


def test_only_a_store_that_did_not_answer_is_called_unreachable():
    """The one-line error says "the store did not answer … run again" for refused, reset and timed-out
    connections (builtin, botocore, requests), never for TLS or proxy failures, where the store (or a proxy)
    did answer and settings must change (review 18)."""
    import botocore.exceptions
    import requests

    from clip_nsfw_spark.storage.filesystem import is_unreachable

    answered_not = [ConnectionRefusedError(), ConnectionResetError(), TimeoutError(),
                    botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"),
                    botocore.exceptions.ConnectionClosedError(endpoint_url="http://x"),
                    botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"),
                    requests.exceptions.ConnectionError(), requests.exceptions.ReadTimeout()]
    answered = [requests.exceptions.SSLError(), requests.exceptions.ProxyError(),
                botocore.exceptions.SSLError(endpoint_url="http://x", error="bad certificate"),
                PermissionError(), FileNotFoundError(), OSError("some other failure")]
    assert [is_unreachable(err) for err in answered_not] == [True] * len(answered_not)
    assert [is_unreachable(err) for err in answered] == [False] * len(answered)
