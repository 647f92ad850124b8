"""The API server as an authenticator (TokenReview), and how to reach it (a client)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import kubernetes.client
import kubernetes.config

from controlplane.sources.kube_convert import KINDS
from controlplane.sources.kube_informer import error_reason

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


# kubernetes.config is not annotated; its two loaders, typed.
_load_kube_config: Callable[..., None] = kubernetes.config.load_kube_config
_load_incluster_config: Callable[..., None] = kubernetes.config.load_incluster_config


class KubernetesConfigError(RuntimeError):
    """No way to reach an API server was found; the message says what was tried."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenReviewResult:
    """What the API server says of a bearer token (``authenticated=False``: refuse it)."""

    authenticated: bool
    username: str = ""
    service_account: tuple[str, str] | None = None  # (namespace, name)
    node_name: str | None = None  # bound tokens name the node their pod runs on
    error: str = ""


def review_token(
    api_client: kubernetes.client.ApiClient, token: str, audiences: list[str] | None = None
) -> TokenReviewResult:
    """Ask the API server (TokenReview) who ``token`` belongs to. Blocking: call it from a
    thread. Fails closed: any error, or an answer that does not confirm one of
    ``audiences``, is ``authenticated=False`` with the reason in ``error``."""
    body = kubernetes.client.V1TokenReview(
        spec=kubernetes.client.V1TokenReviewSpec(token=token, audiences=audiences)
    )
    try:
        review = kubernetes.client.AuthenticationV1Api(api_client).create_token_review(body)
    except Exception as e:
        return TokenReviewResult(
            authenticated=False, error=f"TokenReview failed: {error_reason(e)}"
        )
    status = review.status
    if status is None or not status.authenticated:
        error = (status.error if status is not None else "") or "not authenticated"
        return TokenReviewResult(authenticated=False, error=error)
    if audiences and not set(status.audiences or ()) & set(audiences):
        # The API says: a client that sets spec.audiences must check status.audiences.
        return TokenReviewResult(
            authenticated=False,
            error=f"the API server did not confirm an audience of {audiences}",
        )
    user = status.user
    username = (user.username if user is not None else "") or ""
    extra = (user.extra if user is not None else None) or {}
    service_account = None
    if username.startswith(SERVICE_ACCOUNT_PREFIX):
        namespace, _, name = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
        if namespace and name and ":" not in name:
            service_account = (namespace, name)
    nodes = extra.get(NODE_NAME_EXTRA) or []
    return TokenReviewResult(
        authenticated=True,
        username=username,
        service_account=service_account,
        node_name=nodes[0] if nodes else None,
    )


def api_client_from(kubeconfig: str | None = None) -> kubernetes.client.ApiClient:
    """A client for ``kubeconfig`` if given; else the pod's service account (in-cluster);
    else ``$KUBECONFIG`` or ``~/.kube/config``."""
    configuration = kubernetes.client.Configuration()
    tried = []
    if kubeconfig:
        try:
            _load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        except Exception as e:
            raise KubernetesConfigError(f"cannot use kubeconfig {kubeconfig}: {e}") from e
    else:
        try:
            _load_incluster_config(client_configuration=configuration)
        except Exception as e:
            tried.append(f"in-cluster config: {e}")
            try:
                _load_kube_config(client_configuration=configuration)
            except Exception as e2:
                tried.append(f"kubeconfig ($KUBECONFIG or ~/.kube/config): {e2}")
                raise KubernetesConfigError(
                    "no Kubernetes API server configured; tried "
                    + "; ".join(tried)
                    + " (pass --kubeconfig, or run meshd in a pod)"
                ) from e2
    # One connection per informer's watch, plus lists and token reviews, without
    # urllib3 discarding connections ("Connection pool is full").
    configuration.connection_pool_maxsize = max(
        configuration.connection_pool_maxsize or 0, 2 * len(KINDS) + 4
    )
    return kubernetes.client.ApiClient(configuration)
