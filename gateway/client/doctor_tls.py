"""`doctor`'s TLS check of one gateway host: does its certificate verify here, and if not,
why (untrusted CA, wrong name, expired) and how to fix it. Reads the peer certificate
only to describe it; never trusts it."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from .checkup import Checkup, Report
from .source import tls_context

# OpenSSL verify codes (x509_vfy.h) that mean "signed by a CA this machine does not trust".
_UNTRUSTED = {2, 18, 19, 20, 21, 27}
_EXPIRED, _NOT_YET_VALID, _HOSTNAME_MISMATCH = 10, 9, 62


@dataclass(frozen=True)
class PeerCertificate:
    names: tuple[str, ...]
    issuer: str
    not_after: datetime.datetime


def describe_certificate(der: bytes) -> PeerCertificate:
    certificate = x509.load_der_x509_certificate(der)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple(san.get_values_for_type(x509.DNSName)) + tuple(
            str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        names = ()
    issuer_names = certificate.issuer.get_attributes_for_oid(NameOID.COMMON_NAME) or \
        certificate.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    issuer = str(issuer_names[0].value) if issuer_names else certificate.issuer.rfc4514_string()
    return PeerCertificate(names, issuer, certificate.not_valid_after_utc)


async def _peer_certificate(checkup: Checkup, host: str) -> PeerCertificate | None:
    """The certificate the host presents, unverified: only to say what is wrong with it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            host, checkup.port, ssl=context, server_hostname=host), checkup.timeout)
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        return describe_certificate(der) if der else None
    finally:
        writer.close()


async def check_tls(checkup: Checkup, report: Report, host: str, where: str) -> bool:
    """True when a TLS connection to host verifies with the system's CAs (plus --ca)."""
    port = checkup.port
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(
            host, port, ssl=tls_context(checkup.ca), server_hostname=host), checkup.timeout)
    except ssl.SSLCertVerificationError as exc:
        peer = await _peer_certificate(checkup, host)
        _tls_problem(checkup, report, host, where, exc, peer)
        return False
    except ssl.SSLError as exc:
        report.problem(
            f"{where} does not complete a TLS handshake ({exc.reason or exc})",
            "if it serves plain HTTP, use http:// (Docker only allows that for "
            "localhost); otherwise serve TLS with --tls-listen and a certificate in certs/")
        return False
    except (OSError, TimeoutError) as exc:
        report.problem(f"TLS handshake with {where} failed: {exc or 'timed out'}",
                       "check that the port is the gateway's TLS listener")
        return False
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    writer.close()
    if der:
        peer = describe_certificate(der)
        days = (peer.not_after - datetime.datetime.now(datetime.UTC)).days
        report.ok(f"{where}: TLS verifies (certificate for {', '.join(peer.names)}, "
                  f"issued by {peer.issuer}, valid {days} more days)")
        if days < 14:
            report.problem(
                f"the certificate of {where} expires in {days} days",
                "renew it (acme.sh --renew / certbot renew); the gateway picks up the "
                "new files from certs/ without a restart")
    return True


def _tls_problem(checkup: Checkup, report: Report, host: str, where: str,
                 exc: ssl.SSLCertVerificationError, peer: PeerCertificate | None) -> None:
    code = exc.verify_code
    detail = f" (it names {', '.join(peer.names) or 'nothing'}; issued by " \
             f"{peer.issuer})" if peer else ""
    if code in _UNTRUSTED:
        trusted = f"the CA in {checkup.ca}" if checkup.ca else "a CA this machine trusts"
        report.problem(f"{where}: the certificate is not signed by {trusted}{detail}",
                       _untrusted_fix(checkup, where, peer))
    elif code == _HOSTNAME_MISMATCH:
        target = checkup.target
        domain = target.host if target.base_domain else host.partition(".")[2]
        report.problem(
            f"{where}: the certificate does not cover {host}{detail}",
            f"issue one for {domain} and *.{domain} (acme.sh --issue --dns ... -d {domain} "
            f"-d '*.{domain}') and put it in the gateway's certs/ directory; it is "
            "picked up without a restart")
    elif code in (_EXPIRED, _NOT_YET_VALID):
        report.problem(
            f"{where}: the certificate is {'expired' if code == _EXPIRED else 'not yet valid'}"
            f"{detail}",
            "renew it and replace the files in the gateway's certs/ directory (no restart "
            "needed); check this machine's clock too")
    else:
        report.problem(f"{where}: the certificate does not verify: "
                       f"{exc.verify_message}{detail}",
                       "serve a certificate from a trusted CA for this host name")


def _untrusted_fix(checkup: Checkup, where: str, peer: PeerCertificate | None) -> str:
    if checkup.ca:
        return (f"{checkup.ca} is not the CA that signed the gateway's certificate: use "
                "the CA certificate that issued the files in the gateway's certs/ "
                "directory (the ca.cer/chain of your issuer), or issue a certificate "
                "from that CA")
    fix = (f"if the gateway uses a private CA, give it here: --ca ca.crt, and to the "
           f"runtimes: {checkup.command} client docker {checkup.name} --ca ca.crt "
           f"(writes {checkup.docker_certs_dir}/{where}/ca.crt)")
    if peer is not None and peer.issuer:
        fix += ("\nif it should be publicly trusted, check that the gateway's certs/ "
                "holds the full chain (fullchain.pem / fullchain.cer), not the "
                "certificate alone")
    return fix
