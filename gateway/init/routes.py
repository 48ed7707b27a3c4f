"""The routes.yaml that `registry-gateway init` writes for one domain: every preset route
under its conventional label, the sections an operator tunes first, commented.

Text only: builds a string from the presets; validating it is `check`'s job.
"""

from __future__ import annotations

from ..presets import PRESETS

# The order a reader scans for: the registries pulled most first.
ORDER = ("docker.io", "gcr.io", "ghcr.io", "quay.io", "registry.k8s.io", "k8s.gcr.io",
         "mcr.microsoft.com", "nvcr.io", "docker.elastic.co")

_HEAD = """\
# registry-gateway route table for {domain}, written by `registry-gateway init`.
# Check it:  registry-gateway check {name}
# Every key is explained in the routes.yaml of the source tree and in README.md; the
# running gateway reloads this file when it changes (or on SIGHUP), without a restart.
#
# Each route is a mirror host under {domain} (a wildcard DNS record *.{domain} points
# every one of them at this server, one wildcard certificate covers them all):
{table}
# Clients may also name the registry in the path (hub.{domain}/v2/ghcr.io/...) or send
# containerd's ?ns=; a registry no route names is refused (never an open proxy).

base_domains:
  - {domain}

# Docker's daemon.json "registry-mirrors" sends plain /v2/library/nginx/... requests:
# they go to this route.
default_route: docker.io

# How much disk the cache may use; least recently pulled images are evicted first.
cache:
  min_free: 10%          # keep this much of the filesystem free (a share or a size)
  # max_size: 200GiB     # the most the cache holds
  # max_idle: 30d        # evict what nobody pulled for this long
  lease: 10m             # an image just served keeps its layers this long

# Who may pull. Without this section everyone may; /metrics and /_gateway/* answer
# loopback only. /healthz is always open.
# access:
#   allow: [10.0.0.0/8, 192.0.2.0/24]           # who may connect at all
#   deny: [10.66.0.0/16]                        # refused whatever they send
#   users: /etc/registry-gateway/users.htpasswd # logins: htpasswd -B -c users.htpasswd alice
#   anonymous: [10.0.0.0/8]                     # pull without a login: all, none or CIDRs
#   admin: [127.0.0.1, "::1"]                   # /metrics, /_gateway/*

# Behind nginx or a load balancer on this host, name it so the real client address
# (X-Forwarded-For) counts for access and limits:
# trusted_proxies: [127.0.0.1]

# Per client address: requests, upstream misses (Docker Hub quota) and connections.
# The defaults suit a public mirror on a small VPS; see limits: in README.md.
# limits:
#   requests_per_second: 100
#   misses_per_minute: 120
#   connections_per_ip: 128

# What every route inherits unless it sets its own.
defaults:
  tag_ttl: 10m           # a tag is answered from cache this long, then revalidated (HEAD)
  negative_ttl: 30s      # "manifest unknown" is remembered this long
  stale_if_error: forever  # upstream down: keep answering cached tags

routes:
"""

_DOCKER_HUB = """\
  docker.io:             # hub.{domain}
    # Logged-in pulls have a higher Docker Hub limit; the secret comes from the
    # environment or a file, never from this file:
    # credentials:
    #   username: mydockerid
    #   password_env: DOCKERHUB_TOKEN     # or password_file: /run/secrets/dockerhub
"""

_NGC = """\
  nvcr.io:               # nvcr.{domain}
    # NGC needs an API key for most images (the username is the literal $oauthtoken):
    # credentials: {{username: $oauthtoken, password_file: /run/secrets/ngc-api-key}}
"""

_TAIL = """
  # A registry that is not a preset needs its upstream URL:
  # registry.example.org:
  #   upstream: https://registry.example.org
  #   label: myreg                        # myreg.{domain}
"""


def routes_yaml(domain: str, name: str = "routes.yaml") -> str:
    """The commented route table for `domain` (already validated by the caller)."""
    hosts = mirror_hosts(domain)
    width = max(len(host) for host, _ in hosts)
    table = "\n".join(f"#   {host:<{width}}  ->  {registry}" for host, registry in hosts)
    parts = [_HEAD.format(domain=domain, name=name, table=table)]
    for registry in ORDER:
        if registry == "docker.io":
            parts.append(_DOCKER_HUB.format(domain=domain))
        elif registry == "nvcr.io":
            parts.append(_NGC.format(domain=domain))
        else:
            key = f"{registry}: {{}}"
            parts.append(f"  {key:<21}# {PRESETS[registry].label}.{domain}\n")
    parts.append(_TAIL.format(domain=domain))
    return "".join(parts)


def mirror_hosts(domain: str) -> list[tuple[str, str]]:
    """(host, registry) of every route the file holds, in its order."""
    return [(f"{PRESETS[r].label}.{domain}", r) for r in ORDER]
