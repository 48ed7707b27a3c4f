"""What `registry-gateway init` prints after writing routes.yaml: the next steps (DNS,
a wildcard certificate with acme.sh DNS-01, starting the service, the clients), in
English and 简体中文. Text only; nothing here runs or checks anything.
"""

from __future__ import annotations

from pathlib import Path

from .routes import mirror_hosts

_ENGLISH = """\
Wrote {routes} for {domain}: {count} mirror hosts ({hosts}, ...).

Next steps
1. DNS: point a wildcard record at this server (at your DNS provider):
       *.{domain}.   A      <this server's IPv4 address>
       *.{domain}.   AAAA   <its IPv6 address, if it has one>
   Check it:  getent hosts hub.{domain}
2. One wildcard certificate for every mirror host, with acme.sh (a wildcard needs the
   DNS-01 challenge; dns_cf is Cloudflare, see acme.sh's dnsapi list for dns_ali,
   dns_dp, dns_tencent and others):
       export CF_Token=...            # your DNS provider's API token
       acme.sh --issue --dns dns_cf -d {domain} -d '*.{domain}'
       acme.sh --install-cert -d {domain} --ecc \\
         --fullchain-file {certs}/fullchain.pem \\
         --key-file       {certs}/privkey.pem \\
         --reloadcmd "chown {owner} {certs}/privkey.pem"
   The key must be readable by the gateway's user: {owner} is the container image's; for
   systemd use "chgrp registry-gateway ... && chmod 640 ..." with /etc/registry-gateway/certs.
   Renewals are picked up without a restart.
   See certs/README.md for other layouts (certbot, one certificate per host).
3. Start the gateway, one of:
       docker-compose up -d                      # in the directory of docker-compose.yml,
                                                 # {routes_name} and certs/
       sudo deploy/install.sh --routes {routes}  # systemd: /etc/registry-gateway, unit enabled
   then:  registry-gateway check {routes}
          curl https://hub.{domain}/healthz        # ok
          curl https://hub.{domain}/v2/            # {{}}
4. On each machine that pulls:
       registry-gateway client docker {domain}       # daemon.json registry-mirrors
       registry-gateway client containerd {domain}   # hosts.toml for every registry
       registry-gateway client podman {domain}       # registries.conf.d
       registry-gateway client k8s {domain}          # what to put on the nodes
       registry-gateway doctor {domain}              # checks the result
   or by name:  docker pull hub.{domain}/library/nginx:1.27
More: docs/operations.md (install, upgrade, back up, tune, metrics, alerts).
"""

_CHINESE = """\
已为 {domain} 写入 {routes}：共 {count} 个镜像主机（{hosts} 等）。

下一步
1. DNS：在域名服务商处添加泛解析记录，指向本服务器：
       *.{domain}.   A      <本服务器的 IPv4 地址>
       *.{domain}.   AAAA   <IPv6 地址（如有）>
   检查：getent hosts hub.{domain}
2. 用 acme.sh 申请一张覆盖所有镜像主机的泛域名证书（泛域名证书必须用 DNS-01 验证；
   dns_cf 为 Cloudflare，阿里云用 dns_ali，DNSPod 用 dns_dp，腾讯云用 dns_tencent，
   其余见 acme.sh 的 dnsapi 列表）：
       export CF_Token=...            # DNS 服务商的 API 令牌
       acme.sh --issue --dns dns_cf -d {domain} -d '*.{domain}'
       acme.sh --install-cert -d {domain} --ecc \\
         --fullchain-file {certs}/fullchain.pem \\
         --key-file       {certs}/privkey.pem \\
         --reloadcmd "chown {owner} {certs}/privkey.pem"
   私钥须能被网关的用户读取：{owner} 是容器镜像中的用户；systemd 部署时证书放在
   /etc/registry-gateway/certs，改用 "chgrp registry-gateway ... && chmod 640 ..."。
   证书续期后自动生效，无需重启。其他目录布局（certbot、
   每个主机一张证书）见 certs/README.md。
3. 启动网关（任选其一）：
       docker-compose up -d                      # 在 docker-compose.yml、{routes_name}
                                                 # 和 certs/ 所在目录执行
       sudo deploy/install.sh --routes {routes}  # systemd：安装到 /etc/registry-gateway 并启用服务
   然后：registry-gateway check {routes}
         curl https://hub.{domain}/healthz       # ok
         curl https://hub.{domain}/v2/           # {{}}
4. 在每台需要拉取镜像的机器上：
       registry-gateway client docker {domain}       # 写入 daemon.json 的 registry-mirrors
       registry-gateway client containerd {domain}   # 为每个仓库写 hosts.toml
       registry-gateway client podman {domain}       # registries.conf.d
       registry-gateway client k8s {domain}          # 节点上的配置说明
       registry-gateway doctor {domain}              # 检查配置结果
   或直接用主机名：docker pull hub.{domain}/library/nginx:1.27
更多内容：docs/operations.md（安装、升级、备份、调优、指标、告警）。
"""


def next_steps(domain: str, routes: Path) -> str:
    """Both languages, English first; `routes` is where the table was written."""
    hosts = mirror_hosts(domain)
    values = {
        "domain": domain, "routes": routes, "routes_name": routes.name,
        "certs": routes.parent / "certs", "count": len(hosts),
        "hosts": ", ".join(host for host, _ in hosts[:3]), "owner": "10001",
    }
    return _ENGLISH.format(**values) + "\n" + _CHINESE.format(**values)
