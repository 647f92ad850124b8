"""meshd's TLS certificate: names proxies use, checked against the root, renewed in time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509

from bench.envoy import free_port
from controlplane.serving import DNS_NAMES, ServingCertificate, serving_ips
from mesh.identity import CertificateAuthority
from tests.unit.hbone.conftest import run

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def _names(chain_pem: bytes) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(chain_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    ]


def test_the_certificate_names_istiod_and_the_listen_address() -> None:
    ca = CertificateAuthority.create("cluster.local", now=NOW)
    serving = ServingCertificate(ca, ip_addresses=serving_ips("10.0.0.9"), clock=lambda: NOW)
    dns, ips = _names(serving.chain_pem)
    assert "istiod.istio-system.svc" in dns and set(dns) == set(DNS_NAMES)
    assert ips == ["10.0.0.9", "127.0.0.1", "::1"]
    assert serving_ips("0.0.0.0") == ("127.0.0.1", "::1")  # the unspecified address is no name
    cert = x509.load_pem_x509_certificate(serving.chain_pem)
    assert cert.issuer == ca.root_certificate.subject
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]


def test_renewed_at_half_life_and_not_before() -> None:
    now = [NOW]
    ca = CertificateAuthority.create("cluster.local", now=NOW)
    serving = ServingCertificate(ca, ttl=timedelta(hours=24), clock=lambda: now[0])
    first = serving.chain_pem
    now[0] = NOW + timedelta(hours=11, minutes=59)
    assert serving.fetch() is None and serving.chain_pem == first
    now[0] = NOW + timedelta(hours=12)
    assert serving.fetch() is not None
    assert serving.chain_pem != first and serving.issued == 2
    renewed = x509.load_pem_x509_certificate(serving.chain_pem)
    assert renewed.not_valid_after_utc == now[0] + timedelta(hours=24)


def _echo_server(serving: ServingCertificate) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()

    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.Echo", {"E": handler})]
    )
    port = server.add_secure_port(f"127.0.0.1:{free_port()}", serving.credentials())
    return server, port


def test_a_proxy_trusting_the_root_connects_and_one_trusting_another_does_not() -> None:
    ca = CertificateAuthority.create("cluster.local")
    other = CertificateAuthority.create("cluster.local")
    serving = ServingCertificate(ca)

    async def call(root: bytes, port: int, **options: str) -> bytes:
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{port}", grpc.ssl_channel_credentials(root), options=list(options.items())
        )
        try:
            result: bytes = await channel.unary_unary("/t.Echo/E")(b"hi", timeout=5)
            return result
        finally:
            await channel.close()

    async def body() -> None:
        server, port = _echo_server(serving)
        await server.start()
        try:
            assert await call(ca.root_pem, port) == b"hi"  # by IP: 127.0.0.1 is named
            by_name = {"grpc.ssl_target_name_override": "istiod.istio-system.svc"}
            assert await call(ca.root_pem, port, **by_name) == b"hi"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call(other.root_pem, port)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    run(body, timeout_s=30)
