"""A small Kubernetes API server for tests: real list and watch wire format, in memory.

No API server can run on the test machine, so the Kubernetes source is
tested through the official ``kubernetes`` client against this one. It speaks
what the client and a kind cluster speak: JSON lists with a list
``resourceVersion`` (built-in items without ``kind``/``apiVersion``, custom
resources with them), pagination with ``limit``/``continue``, and
``?watch=true`` streams of newline-delimited events over chunked transfer
encoding that start after the requested ``resourceVersion``, with bookmarks
on request and ``410 Gone`` once a version is compacted away; GET of one
object and POST to a collection (``404 NotFound``, ``409 AlreadyExists``).

Writes, as the API server does them: PUT replaces (``409 Conflict`` when the
body's ``resourceVersion`` is not the current one), PATCH with
``application/merge-patch+json`` (RFC 7386; a ``resourceVersion`` in the
patch is a precondition) and, for built-in kinds only, strategic merge
patches, which are applied as merge patches (lists are replaced, not merged
by key: a difference from the real server); custom resources refuse strategic
merge with 415, as the real server does, and JSON patch and apply patch are
refused with 415 (not implemented here). Kinds with a status subresource keep
their status on writes to the object and take only the status from writes to
``/status`` (a pod its labels and annotations too, as the API server does).
DELETE honours ``preconditions`` and ``propagationPolicy``; the garbage
collector then deletes (or, for ``Orphan``, releases) the dependents
that named the deleted object in their ``ownerReferences`` and have no owner
left, at once rather than a moment later. On writes through the API, Services
and Deployments get the defaults the API server fills in, and a Service
without a ``clusterIP`` is given one (also when added by a test); lists and
watches take equality- and set-based label selectors and field selectors
(``metadata.name``, ``metadata.namespace``, and a pod's ``spec.nodeName`` and
the other fields the API server selects pods by), and a selected watch
reports an object that stops (starts) matching as DELETED (ADDED). Leases
(``coordination.k8s.io/v1``) are checked as the API server checks them: their
``acquireTime`` and ``renewTime`` are ``metav1.MicroTime``, which it parses
with exactly six fractional digits (400 otherwise: what the official Python
client's own serialization of a whole-second datetime earns), and
``leaseDurationSeconds`` must be positive (422).

Tests steer it: ``add``/``update``/``delete`` objects, ``send_bookmark``,
``expire``, ``close_watches``, ``fail_next``, ``refusing`` (one client's requests
fail while the others' are served), ``before`` (another client's write between
two requests), ``writes`` (the write requests served, each with the bearer
token that made it), and a token table for TokenReviews.

The package, by concern: ``resources`` (the kinds served and their paths),
``errors`` (``metav1.Status`` bodies), ``store`` (objects, resourceVersions,
history, garbage collection), ``selectors`` (label and field selectors),
``strategy`` (defaults, validation, what a write may not change), ``api`` (the
verbs, patches, preconditions), ``auth`` (tokens, TokenReview), ``server`` (HTTP:
routing and watch streams), ``kube`` (``FakeKube`` and its controls) and
``objects`` (builders of objects as a kind cluster returns them).
"""

from tests.support.fake_kube.api import MERGE_PATCH, STRATEGIC_MERGE_PATCH
from tests.support.fake_kube.auth import API_AUDIENCE, TOKEN_REVIEWS, TokenInfo
from tests.support.fake_kube.errors import status
from tests.support.fake_kube.kube import FakeKube
from tests.support.fake_kube.objects import (
    KIND_NODES,
    authorization_policy,
    endpoint_slice,
    gateway,
    namespace,
    pod,
    service,
    service_account,
)
from tests.support.fake_kube.resources import GENERATION, RESOURCES, Obj, Resource
from tests.support.fake_kube.server import Request
from tests.support.fake_kube.store import SERVICE_CIDR

__all__ = [
    "API_AUDIENCE",
    "GENERATION",
    "KIND_NODES",
    "MERGE_PATCH",
    "RESOURCES",
    "SERVICE_CIDR",
    "STRATEGIC_MERGE_PATCH",
    "TOKEN_REVIEWS",
    "FakeKube",
    "Obj",
    "Request",
    "Resource",
    "TokenInfo",
    "authorization_policy",
    "endpoint_slice",
    "gateway",
    "namespace",
    "pod",
    "service",
    "service_account",
    "status",
]
