"""--allowed-clients: a comma list or @FILE, every id checked, a file re-read on demand (SIGHUP)."""

from __future__ import annotations

import pytest

from fedlearn.security import AllowList, AllowListError


def test_comma_list_admits_exactly_the_named_ids():
    allowed = AllowList.parse(" site-a, site-b ,client-3,f0123_45 ")
    assert list(allowed) == ["client-3", "f0123_45", "site-a", "site-b"]
    assert allowed.admits("site-a") and "client-3" in allowed
    assert not allowed.admits("site-c") and not allowed.admits("SITE-A") and not allowed.admits("")
    assert 42 not in allowed


def test_file_with_comments_and_reload(tmp_path):
    path = tmp_path / "clients.txt"
    path.write_text("# hospitals\nhospital-a\nhospital-b  # joined in May\n\n")
    allowed = AllowList.parse(f"@{path}")
    assert list(allowed) == ["hospital-a", "hospital-b"]
    path.write_text("hospital-b\nhospital-c\n")
    assert allowed.reload() is True
    assert list(allowed) == ["hospital-b", "hospital-c"] and not allowed.admits("hospital-a")
    path.write_text("hospital-c\nnot an id\n")  # a typo keeps the previous list instead of locking everyone out
    assert allowed.reload() is False
    assert list(allowed) == ["hospital-b", "hospital-c"]


@pytest.mark.parametrize("spec, words", [
    ("", "names no client"),
    (" , ,", "names no client"),
    ("site-a,has space", "'has space' is not a client id"),
    ("site-a,-dash", "is not a client id"),
    ("site-a,x/../y", "is not a client id"),
])
def test_bad_lists_are_one_line_errors(spec, words):
    with pytest.raises(AllowListError, match=words) as caught:
        AllowList.parse(spec)
    assert "\n" not in str(caught.value)


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(AllowListError, match="no such file"):
        AllowList.parse(f"@{tmp_path / 'missing.txt'}")
    bad = tmp_path / "bad.txt"
    bad.write_text("site-a\nsite b\n")
    with pytest.raises(AllowListError, match="line 2: 'site b'"):
        AllowList.parse(f"@{bad}")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n")
    with pytest.raises(AllowListError, match="names no client"):
        AllowList.parse(f"@{empty}")


def test_a_file_name_without_at_is_refused_not_taken_as_an_id(tmp_path, monkeypatch):
    (tmp_path / "clients.txt").write_text("site-a\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AllowListError, match="write @clients.txt"):
        AllowList.parse("clients.txt")
