"""Kubernetes label syntax: keys, values, selectors and ``key=value`` / ``key-`` edits.

The rules are Kubernetes' own (``k8s.io/apimachinery`` validation): a key is
an optional DNS-subdomain prefix and a slash, then a name of at most 63
characters; a value is empty or at most 63 characters. Being strict here means
a label that works in meshlab also works on a real cluster.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mesh.cluster.errors import ClusterSpecError

_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")


def is_dns_label(value: str) -> bool:
    """RFC 1123 label: what Kubernetes requires of namespace names."""
    return bool(_DNS_LABEL.match(value))


def is_dns_subdomain(value: str) -> bool:
    """RFC 1123 subdomain: what Kubernetes requires of pod and account names."""
    return len(value) <= 253 and bool(_DNS_SUBDOMAIN.match(value)) and ".." not in value


def validate_label_key(key: str, path: str = "") -> str:
    """Return ``key`` or raise :class:`ClusterSpecError` saying why it is not a label key."""
    prefix, sep, name = key.rpartition("/")
    if sep and not (prefix and is_dns_subdomain(prefix)):
        raise ClusterSpecError(
            path, f"label key {key!r}: prefix {prefix!r} must be a DNS subdomain"
        )
    if not _NAME.match(name):
        raise ClusterSpecError(
            path,
            f"label key {key!r}: name part {name!r} must be 1-63 characters of "
            "[A-Za-z0-9._-], starting and ending with a letter or digit",
        )
    return key


def validate_label_value(key: str, value: object, path: str = "") -> str:
    """Return ``value`` as a string, or raise if it is not a valid label value."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ClusterSpecError(path, f"label {key!r}: value must be a string, got {value!r}")
    text = str(value)
    if text and not _NAME.match(text):
        raise ClusterSpecError(
            path,
            f"label {key!r}: value {text!r} must be empty or 1-63 characters of "
            "[A-Za-z0-9._-], starting and ending with a letter or digit",
        )
    return text


def parse_labels(raw: object, path: str) -> dict[str, str]:
    """Validate a ``labels:`` mapping from YAML."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ClusterSpecError(path, f"must be a mapping of label keys to values, got {raw!r}")
    labels: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ClusterSpecError(path, f"label key {key!r} must be a string")
        validate_label_key(key, path)
        labels[key] = validate_label_value(key, value, path)
    return labels


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes equality-based selection. An empty selector selects nothing.

    (A Service with no selector has no automatic endpoints; the same holds here.)
    """
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True, kw_only=True)
class LabelEdit:
    """One ``kubectl label`` argument: set ``key`` to ``value``, or remove it (value None)."""

    key: str
    value: str | None

    def __str__(self) -> str:
        return f"{self.key}-" if self.value is None else f"{self.key}={self.value}"


def parse_label_edits(args: Iterable[str]) -> list[LabelEdit]:
    """Parse ``key=value`` and ``key-`` arguments as ``kubectl label`` does."""
    edits: list[LabelEdit] = []
    for arg in args:
        if "=" in arg:
            key, _, value = arg.partition("=")
            validate_label_key(key, arg)
            edits.append(LabelEdit(key=key, value=validate_label_value(key, value, arg)))
        elif arg.endswith("-") and len(arg) > 1:
            key = arg[:-1]
            validate_label_key(key, arg)
            edits.append(LabelEdit(key=key, value=None))
        else:
            raise ClusterSpecError(arg, "expected key=value to set a label or key- to remove it")
    keys = [e.key for e in edits]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ClusterSpecError("", f"label {duplicated[0]!r} is given more than once")
    return edits


def apply_label_edits(
    labels: Mapping[str, str], edits: Iterable[LabelEdit], *, overwrite: bool, what: str
) -> dict[str, str]:
    """Return ``labels`` with ``edits`` applied, with kubectl's rules.

    Changing an existing value needs ``overwrite``; removing an absent key is
    not an error (kubectl prints "label not found" and goes on).
    """
    result = dict(labels)
    for edit in edits:
        if edit.value is None:
            result.pop(edit.key, None)
            continue
        old = result.get(edit.key)
        if old is not None and old != edit.value and not overwrite:
            raise ClusterSpecError(
                edit.key,
                f"{what} already has a value ({old}) for this label; pass --overwrite to change it",
            )
        result[edit.key] = edit.value
    return result
