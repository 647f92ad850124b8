"""Bound service account tokens and the TokenReview API that vouches for them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from tests.support.fake_kube.resources import Obj

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class TokenInfo:
    namespace: str
    service_account: str
    node: str | None
    pod: str | None
    audiences: tuple[str, ...]


def token_review(tokens: Mapping[str, TokenInfo], body: Obj) -> Obj:
    """The TokenReview the API server answers for ``body``: who the token's service
    account is, or why it is not one (unknown token, audiences that do not match)."""
    spec = body.get("spec") or {}
    wanted = list(spec.get("audiences") or [API_AUDIENCE])
    info = tokens.get(spec.get("token", ""))
    review: Obj = {
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": None},
        "spec": spec,
    }
    if info is None:
        review["status"] = {
            "user": {},
            "error": "[invalid bearer token, square/go-jose: error in cryptographic "
            "primitive, token lookup failed]",
        }
        return review
    common = [a for a in wanted if a in info.audiences]
    if not common:
        review["status"] = {
            "user": {},
            "error": f"[invalid bearer token, token audiences {json.dumps(info.audiences)} "
            f"is invalid for the target audiences {json.dumps(wanted)}, unknown]",
        }
        return review
    extra: dict[str, list[str]] = {
        "authentication.kubernetes.io/credential-id": [f"JTI={uuid.uuid4()}"]
    }
    if info.node:
        extra["authentication.kubernetes.io/node-name"] = [info.node]
        extra["authentication.kubernetes.io/node-uid"] = [
            str(uuid.uuid5(uuid.NAMESPACE_DNS, info.node))
        ]
    if info.pod:
        extra["authentication.kubernetes.io/pod-name"] = [info.pod]
        extra["authentication.kubernetes.io/pod-uid"] = [
            str(uuid.uuid5(uuid.NAMESPACE_DNS, info.pod))
        ]
    review["status"] = {
        "authenticated": True,
        "user": {
            "username": f"system:serviceaccount:{info.namespace}:{info.service_account}",
            "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, info.service_account)),
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{info.namespace}",
                "system:authenticated",
            ],
            "extra": extra,
        },
        "audiences": common,
    }
    return review
