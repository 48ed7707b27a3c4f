"""The command line of the client-machine tools: `client docker|containerd|podman|k8s`,
`doctor` and `warm` added to the CLI's subparsers, and what each runs. Turns
ClientConfError into a message and an exit status; the work is in the modules it calls."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from .checkup import Report
from .containerd import containerd_plan
from .docker import docker_plan
from .doctor import Doctor
from .doctor_proxy import check_proxy
from .imageref import parse_platforms
from .k8s import k8s_text
from .plan import Plan, apply, read_text
from .podman import podman_plan
from .proxy_mode import NO_PROXY, containerd_proxy_plan, docker_proxy_plan, proxy_url
from .source import gateway_info, proxy_ca, read_ca, tls_context
from .target import ClientConfError, GatewayInfo, Target, parse_target, probe_urls
from .warm import PARALLEL, WarmOptions, read_images, warm
from .warm_view import Display, summary_json, summary_text


def _plan(args: argparse.Namespace, info: GatewayInfo, target: Target,
          ca: tuple[Path, bytes] | None) -> Plan:
    if args.runtime == "docker":
        return docker_plan(info, target, daemon_json=args.daemon_json,
                           existing=read_text(args.daemon_json),
                           certs_dir=args.certs_dir, ca=ca)
    if args.runtime == "containerd":
        return containerd_plan(info, target, config_path=args.config_path, ca=ca,
                               containerd_config=(args.containerd_config,
                                                  read_text(args.containerd_config)))
    return podman_plan(info, target, conf_d=args.conf_d, certs_dir=args.certs_dir, ca=ca)


def _proxy_plan(args: argparse.Namespace, info: GatewayInfo, target: Target) -> Plan:
    """`--proxy URL`: the daemon's systemd drop-in and the proxy CA (forward-proxy mode)."""
    proxy = proxy_url(args.proxy)
    ca = proxy_ca(args, target, sys.stderr)
    no_proxy = list(dict.fromkeys([*NO_PROXY, *(h.strip() for v in args.no_proxy or ()
                                                for h in v.split(",") if h.strip())]))
    common = {"systemd_dir": args.systemd_dir, "ca": ca, "no_proxy": no_proxy,
              "root": args.root}
    ca_dir = args.proxy_ca_dir or Path(f"/etc/{args.runtime}/registry-gateway-proxy-ca")
    if args.runtime == "docker":
        return docker_proxy_plan(info, proxy, certs_dir=args.certs_dir, ca_dir=ca_dir,
                                 **common)
    return containerd_proxy_plan(info, proxy, config_path=args.config_path, ca_dir=ca_dir,
                                 **common)


def _run_client(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    out, err = sys.stdout, sys.stderr
    try:
        target = parse_target(args.gateway)
        proxied = getattr(args, "proxy", None) is not None
        ca = None if proxied else read_ca(args.ca)
        info = gateway_info(args, target, err)
        if args.runtime == "k8s":
            out.write(k8s_text(info, target, ca=args.ca))
            return 0
        plan = _proxy_plan(args, info, target) if proxied else _plan(args, info, target, ca)
        if args.dry_run:
            out.write(plan.render())
            return 0
        apply(plan, out)
        if plan.notes:
            out.write("\n" + "\n".join(plan.notes) + "\n")
        return 0
    except ClientConfError as exc:
        print(f"registry-gateway client: {exc}", file=err)
        return 1


def _runtime_arguments(parser: argparse.ArgumentParser, *, writes: bool = True) -> None:
    """What every `client <runtime>` takes."""
    parser.add_argument("gateway", help="base domain (example.com, example.com:8443: one "
                        "host per registry) or URL (https://mirror.example.com)")
    parser.add_argument("--ca", type=Path, help="the private CA that signed the gateway's "
                        "certificate (omit for a public CA such as Let's Encrypt)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--routes", help="read the routes from this routes.yaml instead of "
                        "asking the gateway")
    source.add_argument("--presets", action="store_true", help="assume every preset "
                        "route under its standard label instead of asking the gateway")
    parser.add_argument("--timeout", type=float, default=10.0, help=argparse.SUPPRESS)
    if writes:
        parser.add_argument("--dry-run", action="store_true",
                            help="print the files instead of writing them")
    parser.set_defaults(run=_run_client)


def add_commands(sub: Any) -> None:
    """`client docker|containerd|podman|k8s` on the CLI's subparsers."""
    client = sub.add_parser("client", help="write a container runtime's configuration for "
                            "pulling through the gateway")
    runtimes = client.add_subparsers(dest="runtime", required=True)

    docker = runtimes.add_parser("docker", help="merge registry-mirrors into daemon.json")
    _runtime_arguments(docker)
    docker.add_argument("--daemon-json", type=Path, default=Path("/etc/docker/daemon.json"))
    docker.add_argument("--certs-dir", type=Path, default=Path("/etc/docker/certs.d"),
                        help="where dockerd looks for <host:port>/ca.crt")

    containerd = runtimes.add_parser("containerd", help="write hosts.toml per registry")
    _runtime_arguments(containerd)
    containerd.add_argument("--config-path", type=Path, default=Path("/etc/containerd/certs.d"),
                            help="the hosts directory (containerd's registry config_path)")
    containerd.add_argument("--containerd-config", type=Path,
                            default=Path("/etc/containerd/config.toml"),
                            help="containerd's config.toml, checked for config_path")
    for parser in (docker, containerd):
        _proxy_arguments(parser)

    podman = runtimes.add_parser("podman", help="write a registries.conf.d drop-in (podman, "
                                 "skopeo, buildah, CRI-O)")
    _runtime_arguments(podman)
    podman.add_argument("--conf-d", type=Path, default=Path("/etc/containers/registries.conf.d"))
    podman.add_argument("--certs-dir", type=Path, default=Path("/etc/containers/certs.d"))

    k8s = runtimes.add_parser("k8s", help="print what to do on Kubernetes nodes")
    _runtime_arguments(k8s, writes=False)


def _proxy_arguments(parser: argparse.ArgumentParser) -> None:
    """Forward-proxy mode (docs/proxy-mode.md) instead of a mirror."""
    parser.add_argument("--proxy", metavar="URL", help="use the gateway's forward proxy "
                        "(serve --proxy-listen) as http://HOST:PORT: writes the systemd "
                        "drop-in (HTTPS_PROXY, NO_PROXY) and installs the proxy CA (--ca, "
                        "else the gateway's /_gateway/ca.crt)")
    parser.add_argument("--no-proxy", action="append", metavar="HOSTS",
                        help="also in NO_PROXY (comma-separated; repeatable); localhost "
                        "and loopback always are")
    parser.add_argument("--systemd-dir", type=Path, default=Path("/etc/systemd/system"),
                        help="where the <unit>.service.d/http-proxy.conf drop-in goes")
    parser.add_argument("--proxy-ca-dir", type=Path, help="the CA directory the drop-in "
                        "adds with SSL_CERT_DIR (default /etc/<runtime>/"
                        "registry-gateway-proxy-ca)")
    parser.add_argument("--root", type=Path, help="write every file under this directory "
                        "(as a chroot would see it), e.g. for an image being built")


def _run_doctor(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    out: TextIO = sys.stdout
    try:
        target = parse_target(args.gateway)
        read_ca(args.ca)
    except ClientConfError as exc:
        print(f"registry-gateway doctor: {exc}", file=sys.stderr)
        return 2
    if args.proxy:
        return _run_proxy_doctor(args, out)
    docker_host = args.docker_host or env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    doctor = Doctor(target, ca=args.ca, timeout=args.timeout, docker_host=docker_host,
                    daemon_json=args.daemon_json, docker_certs_dir=args.docker_certs_dir)
    print(f"registry-gateway doctor: checking {probe_urls(target)[0]} from this machine",
          file=out)
    report = asyncio.run(doctor.run())
    out.write(report.render())
    return 1 if report.problems else 0


def _run_proxy_doctor(args: argparse.Namespace, out: TextIO) -> int:
    try:
        proxy = proxy_url(args.proxy)
    except ClientConfError as exc:
        print(f"registry-gateway doctor: {exc}", file=sys.stderr)
        return 2
    print(f"registry-gateway doctor: checking the forward proxy {args.proxy} from this "
          "machine", file=out)
    report = Report()
    asyncio.run(check_proxy(report, proxy, ca=args.ca, host=args.proxy_host,
                            seconds=args.timeout))
    out.write(report.render())
    return 1 if report.problems else 0


def add_doctor(sub: Any) -> None:
    """`doctor` on the CLI's subparsers."""
    doctor = sub.add_parser("doctor", help="check from a client machine that the gateway "
                            "works and that this machine uses it")
    doctor.add_argument("gateway", help="base domain (example.com) or URL "
                        "(https://mirror.example.com), as given to `client`")
    doctor.add_argument("--ca", type=Path, help="the gateway's private CA, if it uses one")
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds per check")
    doctor.add_argument("--docker-host", help="Docker daemon socket (default: $DOCKER_HOST "
                        "or unix:///var/run/docker.sock)")
    doctor.add_argument("--daemon-json", type=Path, default=Path("/etc/docker/daemon.json"))
    doctor.add_argument("--docker-certs-dir", type=Path, default=Path("/etc/docker/certs.d"))
    doctor.add_argument("--proxy", metavar="URL", help="check the forward-proxy path "
                        "instead: a CONNECT through http://HOST:PORT reaches a registry")
    doctor.add_argument("--proxy-host", default="registry-1.docker.io",
                        help="the registry host to reach through --proxy")
    doctor.set_defaults(run=_run_doctor)


def _run_warm(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        target = parse_target(args.gateway)
        if target.base_domain:
            raise ClientConfError(f"{args.gateway!r}: give the gateway's URL (http://HOST:PORT "
                                  "or https://HOST); warm reaches every registry through "
                                  "/v2/<registry>/ on it")
        read_ca(args.ca)
        refs = read_images(args.images, args.file or ())
        platforms = parse_platforms(",".join(args.platform)) if args.platform else None
        if args.parallel < 1:
            raise ClientConfError("--parallel: at least 1")
        # Built before the loop starts: loading a CA file is blocking I/O.
        context = tls_context(args.ca) if target.scheme == "https" else None
    except ClientConfError as exc:
        print(f"registry-gateway warm: {exc}", file=sys.stderr)
        return 2
    progress = sys.stderr if args.json else sys.stdout  # --json: stdout is the document
    display = Display(progress, tty=progress.isatty(),
                      width=shutil.get_terminal_size().columns)
    options = WarmOptions(platforms, args.parallel, args.timeout)
    started = time.monotonic()
    try:
        outcomes = asyncio.run(warm(target, refs, options, display, context))
    except ClientConfError as exc:
        print(f"registry-gateway warm: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("registry-gateway warm: interrupted", file=sys.stderr)
        return 130
    seconds = time.monotonic() - started
    if args.json:
        print(json.dumps(summary_json(outcomes, seconds), indent=2))
    else:
        print("\n" + summary_text(outcomes, seconds), end="")
    failed = [o for o in outcomes if o.failed]
    if failed:
        print(f"registry-gateway warm: {len(failed)} of {len(outcomes)} images failed:\n"
              + "".join(f"  {o.image}: {o.error}\n" for o in failed), end="", file=sys.stderr)
    return 1 if failed else 0


def add_warm(sub: Any) -> None:
    """`warm` on the CLI's subparsers."""
    warm_parser = sub.add_parser(
        "warm", help="pull images through a running gateway so that it caches them",
        description="Pull images through a running gateway (its single flight and cache "
        "apply): each manifest, then the config and layers of the platforms asked for, "
        "streamed, verified and discarded. Without --platform, every platform of a "
        "multi-platform image is warmed (attestation manifests are skipped); an image that is "
        "not multi-platform is warmed as it is. Exit status: 0 when every image was warmed, "
        "1 when one failed, 2 when nothing could be tried.")
    warm_parser.add_argument("gateway", metavar="URL", help="the gateway's URL, e.g. "
                             "http://127.0.0.1:5000 or https://mirror.example.com")
    warm_parser.add_argument("images", nargs="*", metavar="IMAGE", help="nginx:1.27, "
                             "ghcr.io/org/app@sha256:..., registry.k8s.io/pause:3.9")
    warm_parser.add_argument("--file", type=Path, action="append", metavar="LIST",
                             help="read images from this file (- for stdin), one per line; "
                             "blank lines and # comments are ignored; repeatable")
    warm_parser.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                             help="only these platforms, comma-separated or repeated, e.g. "
                             "linux/amd64,linux/arm64 (default: every platform of an index)")
    warm_parser.add_argument("--ca", type=Path, help="the gateway's private CA, if it uses one")
    warm_parser.add_argument("--parallel", type=int, default=PARALLEL, metavar="N",
                             help=f"blobs fetched at once (default {PARALLEL}, like dockerd)")
    warm_parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                             help="fail a transfer that connects or sends nothing for this "
                             "long (default 60)")
    warm_parser.add_argument("--json", action="store_true", help="print the summary as "
                             "JSON on stdout (progress goes to stderr)")
    warm_parser.set_defaults(run=_run_warm)
