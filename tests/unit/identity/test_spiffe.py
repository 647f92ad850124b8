"""SPIFFE IDs: one canonical spelling per workload; every other spelling refused, saying why."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.identity import InvalidSpiffeId, SpiffeId, validate_trust_domain

trust_domains = st.from_regex(r"[a-z0-9._-]{1,255}", fullmatch=True)
namespaces = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
_label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True)
service_accounts = (
    st.lists(_label, min_size=1, max_size=12).map(".".join).filter(lambda sa: len(sa) <= 253)
)


@given(td=trust_domains, ns=namespaces, sa=service_accounts)
def test_valid_ids_round_trip_through_text(td: str, ns: str, sa: str) -> None:
    text = f"spiffe://{td}/ns/{ns}/sa/{sa}"
    parsed = SpiffeId.parse(text)
    assert (parsed.trust_domain, parsed.namespace, parsed.service_account) == (td, ns, sa)
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed
    assert SpiffeId(trust_domain=td, namespace=ns, service_account=sa) == parsed


valid_ids = st.builds(
    lambda td, ns, sa: f"spiffe://{td}/ns/{ns}/sa/{sa}", trust_domains, namespaces, service_accounts
)


@st.composite
def near_misses(draw: st.DrawFn) -> str:
    """A valid ID with one character inserted, replaced or removed."""
    text = draw(valid_ids)
    i = draw(st.integers(0, len(text) - 1))
    ch = draw(st.sampled_from("/.:-_%?#@A ~\\x0"))
    edit = draw(st.sampled_from(["insert", "replace", "delete"]))
    if edit == "insert":
        return text[:i] + ch + text[i:]
    if edit == "replace":
        return text[:i] + ch + text[i + 1 :]
    return text[:i] + text[i + 1 :]


@given(st.one_of(near_misses(), st.text(alphabet="spife:/.nsa-_%?#@Q0123456789", max_size=40)))
def test_anything_accepted_is_already_in_canonical_form(text: str) -> None:
    # If two spellings parsed to the same identity, a policy naming one could be
    # dodged with the other; so whatever parses must print back exactly as given.
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeId:
        return
    assert str(parsed) == text


def test_parse_of_an_istio_identity() -> None:
    parsed = SpiffeId.parse("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage")
    assert parsed.trust_domain == "cluster.local"
    assert parsed.namespace == "bookinfo"
    assert parsed.service_account == "bookinfo-productpage"


MALFORMED = [
    ("", "scheme"),
    ("cluster.local/ns/a/sa/b", "scheme"),
    ("http://cluster.local/ns/a/sa/b", "scheme"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
    (" spiffe://cluster.local/ns/a/sa/b", "scheme"),
    ("spiffe:/cluster.local/ns/a/sa/b", "scheme"),
    ("spiffe:///ns/a/sa/b", "trust domain"),
    ("spiffe://Cluster.local/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster.local:8080/ns/a/sa/b", "trust domain"),
    ("spiffe://admin@cluster.local/ns/a/sa/b", "trust domain"),
    ("spiffe://clu$ter/ns/a/sa/b", "trust domain"),
    ("spiffe://" + "a" * 256 + "/ns/a/sa/b", "trust domain"),
    ("spiffe://cluster.local", "path"),
    ("spiffe://cluster.local/", "path"),
    ("spiffe://cluster.local/ns/a/sa/b/", "path"),
    ("spiffe://cluster.local/ns//sa/b", "path"),
    ("spiffe://cluster.local/ns/a/sa", "path"),
    ("spiffe://cluster.local/ns/a/sa/b/c", "path"),
    ("spiffe://cluster.local/namespace/a/sa/b", "path"),
    ("spiffe://cluster.local/ns/a/serviceaccount/b", "path"),
    ("spiffe://cluster.local/sa/b/ns/a", "path"),
    ("spiffe://cluster.local/ns/A/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/-a/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/a-/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/a.b/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/a_b/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/" + "a" * 64 + "/sa/b", "namespace"),
    ("spiffe://cluster.local/ns/a/sa/B", "service account"),
    ("spiffe://cluster.local/ns/a/sa/.b", "service account"),
    ("spiffe://cluster.local/ns/a/sa/b..c", "service account"),
    ("spiffe://cluster.local/ns/a/sa/b_c", "service account"),
    ("spiffe://cluster.local/ns/a/sa/b c", "service account"),
    ("spiffe://cluster.local/ns/a/sa/" + "b" * 254, "service account"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
    ("spiffe://cluster.local/ns/a/sa/b#frag", "fragment"),
    ("spiffe://cluster.local/ns/a/sa/%62", "percent-encoding"),
]


@pytest.mark.parametrize(("text", "part"), MALFORMED)
def test_malformed_ids_are_refused_naming_the_bad_part(text: str, part: str) -> None:
    with pytest.raises(InvalidSpiffeId) as excinfo:
        SpiffeId.parse(text)
    assert excinfo.value.part == part
    assert part in str(excinfo.value)


def test_error_message_shows_the_offending_value() -> None:
    with pytest.raises(InvalidSpiffeId, match=r"'Default'.*upper case"):
        SpiffeId.parse("spiffe://cluster.local/ns/Default/sa/web")
    with pytest.raises(InvalidSpiffeId, match="64 characters long, the maximum is 63"):
        SpiffeId.parse("spiffe://cluster.local/ns/" + "a" * 64 + "/sa/b")


@pytest.mark.parametrize(
    ("td", "ns", "sa", "part"),
    [
        ("", "ns", "sa", "trust domain"),
        ("cluster.local", "NS", "sa", "namespace"),
        ("cluster.local", "ns", "", "service account"),
        ("cluster.local", "ns", "a/b", "service account"),
    ],
)
def test_an_invalid_value_cannot_be_constructed(td: str, ns: str, sa: str, part: str) -> None:
    with pytest.raises(InvalidSpiffeId) as excinfo:
        SpiffeId(trust_domain=td, namespace=ns, service_account=sa)
    assert excinfo.value.part == part


def test_ids_are_immutable_hashable_values() -> None:
    a = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")
    b = SpiffeId(trust_domain="cluster.local", namespace="a", service_account="b")
    assert a == b
    assert {a: 1}[b] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.namespace = "other"  # type: ignore[misc]


def test_the_longest_names_kubernetes_allows_are_accepted() -> None:
    sa = ".".join(["b" * 63] * 4)[:253].rstrip(".")
    parsed = SpiffeId.parse(f"spiffe://cluster.local/ns/{'a' * 63}/sa/{sa}")
    assert parsed.namespace == "a" * 63
    assert parsed.service_account == sa


def test_validate_trust_domain() -> None:
    assert validate_trust_domain("example.org") == "example.org"
    assert validate_trust_domain("td_with-all.kinds9") == "td_with-all.kinds9"
    for bad in ("", "Example.org", "example.org:443", "a/b", "a" * 256):
        with pytest.raises(InvalidSpiffeId) as excinfo:
            validate_trust_domain(bad)
        assert excinfo.value.part == "trust domain"
