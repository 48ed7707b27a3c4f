"""`doctor --proxy URL`: from a client machine, check the forward-proxy path: the proxy
takes a CONNECT to a registry host, the certificate it answers with verifies (the proxy
CA is trusted), and the registry API answers through it; says whether the gateway
intercepts (cached) or tunnels (not cached). Reads nothing secret.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from .checkup import Report
from .source import tls_context

FIX_CA = ("install the gateway's proxy CA: registry-gateway client docker|containerd GATEWAY "
          "--proxy URL (or pass --ca CA.crt here)")


async def _status(proxy: str, url: str, context: ssl.SSLContext, seconds: float) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds),
                                     trust_env=False) as session, \
            session.get(url, proxy=proxy, ssl=context, allow_redirects=False) as answer:
        return answer.status


async def check_proxy(report: Report, proxy: str, *, ca: Path | None, host: str,
                      seconds: float) -> None:
    """`ca` trusted alone first: a certificate that verifies against it alone came from
    the gateway (intercepted); else the system's roots (a tunnel to the real registry)."""
    url = f"https://{host}/v2/"
    intercepted = False
    try:
        if ca is not None:
            try:
                status = await _status(proxy, url, ssl.create_default_context(cafile=str(ca)),
                                       seconds)
                intercepted = True
            except aiohttp.ClientConnectorCertificateError:
                status = await _status(proxy, url, tls_context(None), seconds)
        else:
            status = await _status(proxy, url, tls_context(None), seconds)
    except aiohttp.ClientHttpProxyError as exc:
        fix = ("log in: --proxy http://USER:PASSWORD@HOST:PORT" if exc.status == 407 else
               f"name {host} in a route or forward_proxy.hosts of the gateway's routes.yaml")
        report.problem(f"the proxy {proxy} refused CONNECT {host}:443 ({exc.status})", fix)
        return
    except aiohttp.ClientConnectorCertificateError as exc:
        report.problem(f"the certificate {proxy} gave for {host} does not verify: "
                       f"{exc.certificate_error}", FIX_CA)
        return
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
        report.problem(f"{url} through the proxy {proxy}: {exc or type(exc).__name__}",
                       "check that the gateway runs serve --proxy-listen on that address")
        return
    if status not in (200, 401):
        report.problem(f"{url} through the proxy answered HTTP {status}",
                       "look at the gateway's log for this request")
    elif intercepted:
        report.ok(f"the proxy {proxy} intercepts {host}: the gateway answers it from its "
                  f"cache (certificate from its CA; /v2/ said {status})")
    else:
        report.ok(f"the proxy {proxy} tunnels {host} (the registry's own certificate; /v2/ "
                  f"said {status}): pulls work but are NOT cached")
