"""Label syntax and ``kubectl label`` semantics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.cluster import ClusterSpecError, apply_label_edits, parse_label_edits, selector_matches
from mesh.cluster.labels import validate_label_key, validate_label_value


@pytest.mark.parametrize(
    "key", ["app", "istio.io/dataplane-mode", "a.b-c_d", "x" * 63, "example.com/" + "y" * 63]
)
def test_valid_keys(key: str) -> None:
    assert validate_label_key(key) == key


@pytest.mark.parametrize(
    "key", ["", "-app", "app-", "x" * 64, "/app", "Example.com/app", "a/b/c", "sp ace"]
)
def test_invalid_keys(key: str) -> None:
    with pytest.raises(ClusterSpecError, match="label key"):
        validate_label_key(key)


def test_values_are_label_syntax_or_empty() -> None:
    assert validate_label_value("k", "") == ""
    assert validate_label_value("k", "ambient") == "ambient"
    assert validate_label_value("k", 3) == "3"
    for bad in ("-x", "x" * 64, "a b", True, None, ["x"]):
        with pytest.raises(ClusterSpecError):
            validate_label_value("k", bad)


def test_edits_parse_like_kubectl() -> None:
    edits = parse_label_edits(["istio.io/dataplane-mode=ambient", "team-", "empty="])
    assert [str(e) for e in edits] == ["istio.io/dataplane-mode=ambient", "team-", "empty="]
    for bad in (["noequals"], ["-"], ["a=1", "a=2"], ["bad key=1"]):
        with pytest.raises(ClusterSpecError):
            parse_label_edits(bad)


def test_overwrite_is_needed_to_change_a_value() -> None:
    labels = {"mode": "none", "team": "a"}
    with pytest.raises(ClusterSpecError, match="--overwrite"):
        apply_label_edits(labels, parse_label_edits(["mode=ambient"]), overwrite=False, what="x")
    changed = apply_label_edits(
        labels, parse_label_edits(["mode=ambient", "team-", "gone-"]), overwrite=True, what="x"
    )
    assert changed == {"mode": "ambient"}
    # Setting the value a label already has is not a change and needs no overwrite.
    assert apply_label_edits(labels, parse_label_edits(["team=a"]), overwrite=False, what="x") == (
        labels
    )


def test_selectors() -> None:
    assert selector_matches({"app": "echo"}, {"app": "echo", "v": "1"})
    assert not selector_matches({"app": "echo", "v": "2"}, {"app": "echo", "v": "1"})
    assert not selector_matches({}, {"app": "echo"}), "an empty selector selects nothing"


_name = st.from_regex(r"[a-z0-9]([a-z0-9._-]{0,20}[a-z0-9])?", fullmatch=True)


@given(key=_name, value=_name)
def test_any_valid_label_round_trips_through_an_edit(key: str, value: str) -> None:
    (edit,) = parse_label_edits([f"{key}={value}"])
    assert (edit.key, edit.value) == (key, value)
    assert parse_label_edits([str(edit)]) == [edit]
