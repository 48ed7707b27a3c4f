"""What one `doctor` run checks with (`Checkup`: the gateway, the CA, where Docker lives) and
what it found (`Report`: findings, each problem with its fix). Data and rendering only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .target import Target


@dataclass(frozen=True)
class Checkup:
    target: Target
    ca: Path | None
    timeout: float
    docker_host: str | None
    daemon_json: Path
    docker_certs_dir: Path
    command: str = "registry-gateway"

    @property
    def name(self) -> str:
        """The gateway as `client` wants it, for the fixes doctor prints."""
        if self.target.base_domain:
            return self.target.netloc(self.target.host)
        return self.target.url()

    @property
    def ca_option(self) -> str:
        return f" --ca {self.ca}" if self.ca else ""

    @property
    def port(self) -> int:
        return self.target.port or (443 if self.target.scheme == "https" else 80)


@dataclass
class Finding:
    ok: bool
    message: str
    fix: str = ""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def ok(self, message: str) -> None:
        self.findings.append(Finding(True, message))

    def problem(self, message: str, fix: str) -> None:
        self.findings.append(Finding(False, message, fix))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def render(self) -> str:
        lines = []
        for finding in self.findings:
            lines.append(f"  {'ok' if finding.ok else 'PROBLEM':<8} {finding.message}")
            for number, line in enumerate(finding.fix.splitlines()):
                lines.append(f"  {'':<8} {'fix:' if number == 0 else '':<4} {line}")
        count = len(self.problems)
        lines.append(f"{count} problem{'s' if count != 1 else ''} found." if count
                     else "No problems found.")
        return "\n".join(lines) + "\n"
