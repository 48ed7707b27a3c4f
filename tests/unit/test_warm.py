"""`registry-gateway warm` (gateway/client/warm*.py, imageref.py): image references with
Docker's normalisation, platforms and which index entries they select, the image list
file, the progress display and the summary; and the engine against the fake registry
standing in for a gateway: wrong bytes, a short body and an HTTP error fail the image,
X-Cache decides which bytes count as from cache."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from gateway.client.imageref import (
    ImageRef,
    Platform,
    normalise,
    parse_image,
    parse_platform,
    parse_platforms,
)
from gateway.client.target import ClientConfError, parse_target
from gateway.client.warm import WarmOptions, read_images, warm
from gateway.client.warm_manifest import (
    Descriptor,
    ImageDoc,
    IndexDoc,
    WarmError,
    parse_manifest,
    select,
)
from gateway.client.warm_view import (
    Display,
    ImageOutcome,
    human_bytes,
    summary_json,
    summary_text,
)
from tests.support.fake_registry import FakeRegistry, image_manifest
from tests.support.faults import Fault
from tests.support.images import OCI_INDEX, OCI_MANIFEST, sha256_digest

DIGEST = "sha256:" + "ab" * 32

# -- image references --------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("nginx", ImageRef("docker.io", "library/nginx", "latest")),
    ("nginx:1.27", ImageRef("docker.io", "library/nginx", "1.27")),
    ("docker.io/library/nginx:1.27", ImageRef("docker.io", "library/nginx", "1.27")),
    ("index.docker.io/nginx", ImageRef("docker.io", "library/nginx", "latest")),
    ("registry-1.docker.io/bitnami/redis:7", ImageRef("docker.io", "bitnami/redis", "7")),
    ("user/app", ImageRef("docker.io", "user/app", "latest")),
    (f"ghcr.io/org/app@{DIGEST}", ImageRef("ghcr.io", "org/app", None, DIGEST)),
    (f"ghcr.io/org/app:1.0@{DIGEST}", ImageRef("ghcr.io", "org/app", "1.0", DIGEST)),
    ("registry.k8s.io/pause:3.9", ImageRef("registry.k8s.io", "pause", "3.9")),
    ("localhost:5000/team/app", ImageRef("localhost:5000", "team/app", "latest")),
    ("localhost/app:v1", ImageRef("localhost", "app", "v1")),
    ("GHCR.io/org/app", ImageRef("ghcr.io", "org/app", "latest")),
    ("  quay.io/org/app:x  ", ImageRef("quay.io", "org/app", "x")),
])
def test_image_references_are_normalised_like_docker(text: str, expected: ImageRef) -> None:
    assert parse_image(text) == expected


def test_an_image_is_asked_for_by_digest_when_it_has_one() -> None:
    both = parse_image(f"ghcr.io/org/app:1.0@{DIGEST}")
    assert both.reference == DIGEST
    assert str(both) == f"ghcr.io/org/app:1.0@{DIGEST}"
    assert parse_image("nginx").reference == "latest"
    assert parse_image("nginx").path("manifests", "latest") == \
        "/v2/docker.io/library/nginx/manifests/latest"


@pytest.mark.parametrize(("text", "says"), [
    ("", "invalid repository name"),
    ("Nginx", "invalid repository name"),
    ("nginx:", "invalid tag"),
    ("nginx@sha256:abc", "invalid digest"),
    ("ghcr.io/", "invalid repository name"),
    ("ghcr.io/Org/app", "invalid repository name"),
    ("ex_ample.com:80/app", "not a registry host"),
    ("nginx:bad tag", "invalid tag"),
])
def test_invalid_references_are_refused_naming_the_image(text: str, says: str) -> None:
    with pytest.raises(ClientConfError, match=re.escape(says)) as caught:
        parse_image(text)
    assert repr(text.strip())[:20] in str(caught.value)


_component = st.from_regex(r"[a-z0-9]{1,6}([._-][a-z0-9]{1,4})?", fullmatch=True)
_host = st.builds(lambda a, b, port: f"{a}.{b}" + (f":{port}" if port else ""),
                  st.from_regex(r"[a-z][a-z0-9-]{0,6}[a-z0-9]", fullmatch=True),
                  st.sampled_from(["io", "com", "example.test"]),
                  st.one_of(st.none(), st.integers(1, 65535)))


@given(registry=st.one_of(st.none(), _host),
       components=st.lists(_component, min_size=1, max_size=3),
       tag=st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}",
                                              fullmatch=True)),
       digest=st.one_of(st.none(), st.from_regex(r"sha256:[a-f0-9]{64}", fullmatch=True)))
def test_references_round_trip(registry: str | None, components: list[str], tag: str | None,
                               digest: str | None) -> None:
    # Without a registry, a first component with a dot names one (docker's rule).
    assume(registry or len(components) == 1 or "." not in components[0])
    text = "/".join(([registry] if registry else []) + components)
    text += (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    ref = parse_image(text)
    assert parse_image(str(ref)) == ref
    assert ref.registry == (registry or "docker.io")
    expected_repository = "/".join(components)
    if registry is None and len(components) == 1:
        expected_repository = "library/" + expected_repository
    assert ref.repository == expected_repository
    assert (ref.tag, ref.digest) == (tag or (None if digest else "latest"), digest)


# -- platforms -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("linux/amd64", Platform("linux", "amd64")),
    ("linux/x86_64", Platform("linux", "amd64")),
    ("linux/amd64/v1", Platform("linux", "amd64")),
    ("linux/amd64/v3", Platform("linux", "amd64", "v3")),
    ("linux/arm64", Platform("linux", "arm64")),
    ("linux/aarch64/v8", Platform("linux", "arm64")),
    ("linux/arm/7", Platform("linux", "arm", "v7")),
    ("linux/arm", Platform("linux", "arm")),
    ("Windows/AMD64", Platform("windows", "amd64")),
])
def test_platforms_are_normalised_like_containerd(text: str, expected: Platform) -> None:
    assert parse_platform(text) == expected


@pytest.mark.parametrize("text", ["linux", "linux/amd64/v1/x", "", "linux/", "linux/a b"])
def test_invalid_platforms_are_refused(text: str) -> None:
    with pytest.raises(ClientConfError, match="os/architecture"):
        parse_platform(text)


def test_a_platform_list_is_deduplicated_in_order() -> None:
    assert parse_platforms("linux/arm64, linux/amd64,linux/aarch64") == (
        Platform("linux", "arm64"), Platform("linux", "amd64"))
    with pytest.raises(ClientConfError, match="at least one"):
        parse_platforms(" , ")


def test_a_platform_without_variant_matches_every_variant() -> None:
    arm = parse_platform("linux/arm")
    v6, v7 = normalise("linux", "arm", "v6", entry=True), normalise("linux", "arm", None,
                                                                    entry=True)
    assert v7 == Platform("linux", "arm", "v7"), "an index entry arm without variant is v7"
    assert arm.matches(v6) and arm.matches(v7)
    assert parse_platform("linux/arm/v7").matches(v7)
    assert not parse_platform("linux/arm/v7").matches(v6)
    assert parse_platform("linux/arm64").matches(normalise("linux", "arm64", "v8", entry=True))
    assert not parse_platform("linux/amd64").matches(Platform("windows", "amd64"))


_platforms = st.builds(normalise, st.sampled_from(["linux", "windows", "darwin", "macos"]),
                       st.sampled_from(["amd64", "x86_64", "arm64", "aarch64", "arm", "armhf",
                                        "386", "s390x", "ppc64le", "riscv64"]),
                       st.one_of(st.none(), st.sampled_from(["v5", "6", "v7", "v8", "v1",
                                                             "v2"])))


@given(_platforms)
def test_normalising_is_idempotent_and_a_platform_matches_itself(platform: Platform) -> None:
    assert parse_platform(str(platform)) == platform
    assert platform.matches(platform)
    assert Platform(platform.os, platform.architecture).matches(platform)


# -- manifests and selection -----------------------------------------------------------


def _entry(platform: Platform | None, n: int, *, attestation: bool = False) -> Descriptor:
    return Descriptor(OCI_MANIFEST, f"sha256:{n:064x}", 100 + n, platform, attestation)


AMD, ARM64 = Platform("linux", "amd64"), Platform("linux", "arm64")
ARM6, ARM7 = Platform("linux", "arm", "v6"), Platform("linux", "arm", "v7")
ENTRIES = (_entry(AMD, 1), _entry(ARM64, 2), _entry(ARM6, 3), _entry(ARM7, 4),
           _entry(Platform("unknown", "unknown"), 5, attestation=True), _entry(None, 6))


def test_without_platforms_every_runnable_entry_is_chosen() -> None:
    chosen = select(ENTRIES, None)
    assert [e.digest for e in chosen.chosen] == [e.digest for e in ENTRIES if not e.attestation]
    assert chosen.missing == ()


def test_platforms_choose_their_entries_and_name_the_missing_ones() -> None:
    wanted = (ARM64, Platform("linux", "arm"), Platform("linux", "s390x"))
    chosen = select(ENTRIES, wanted)
    assert [e.platform for e in chosen.chosen] == [ARM64, ARM6, ARM7]
    assert chosen.missing == (Platform("linux", "s390x"),)
    twice = select((*ENTRIES, _entry(ARM64, 2)), (ARM64,))
    assert [e.digest for e in twice.chosen] == [ENTRIES[1].digest], "each digest once"


@given(st.lists(_platforms, max_size=6), st.lists(_platforms, min_size=1, max_size=3))
def test_selection_is_exactly_the_matching_entries(have: list[Platform],
                                                   wanted: list[Platform]) -> None:
    entries = [_entry(p, n) for n, p in enumerate(have)]
    chosen = select(entries, wanted)
    assert list(chosen.chosen) == [e for e in entries
                                   if any(w.matches(e.platform) for w in wanted if e.platform)]
    assert set(chosen.missing) == {w for w in wanted if not any(w.matches(p) for p in have)}


def test_manifests_parse_into_an_index_or_an_image() -> None:
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": DIGEST, "size": 9,
         "platform": {"os": "linux", "architecture": "aarch64"}},
        {"mediaType": OCI_MANIFEST, "digest": DIGEST, "size": 9,
         "platform": {"os": "unknown", "architecture": "unknown"},
         "annotations": {"vnd.docker.reference.type": "attestation-manifest"}}]}).encode()
    parsed = parse_manifest(OCI_INDEX, index)
    assert isinstance(parsed, IndexDoc)
    assert [(e.platform, e.attestation) for e in parsed.entries] == [
        (ARM64, False), (Platform("unknown", "unknown"), True)]
    image = parse_manifest(None, image_manifest(b"layer", config=b"{}"))
    assert isinstance(image, ImageDoc)
    assert [b.digest for b in image.blobs] == [sha256_digest(b"{}"), sha256_digest(b"layer")]


@pytest.mark.parametrize(("media_type", "body", "says"), [
    ("application/vnd.docker.distribution.manifest.v1+prettyjws", b"{}", "not an image"),
    (None, b"not json", "not JSON"),
    (None, b"[]", "not a JSON object"),
    (OCI_MANIFEST, b'{"config": {"digest": "sha256:12", "size": 1}, "layers": []}',
     "invalid digest"),
    (OCI_MANIFEST, json.dumps({"config": {"digest": DIGEST, "size": True},
                               "layers": []}).encode(), "no valid digest and size"),
    (OCI_INDEX, b'{"manifests": {}}', "not a list"),
])
def test_manifests_warm_cannot_read_are_refused(media_type: str | None, body: bytes,
                                                says: str) -> None:
    with pytest.raises(WarmError, match=says):
        parse_manifest(media_type, body)


# -- the image list ---------------------------------------------------------------------


def test_the_image_list_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("# base images\n\nnginx:1.27  # web\n  registry.k8s.io/pause:3.9\n"
                       "docker.io/library/nginx:1.27\n")
    refs = read_images(["alpine"], [listing])
    assert [str(r) for r in refs] == ["docker.io/library/alpine:latest",
                                      "docker.io/library/nginx:1.27",
                                      "registry.k8s.io/pause:3.9"]


def test_a_bad_line_or_file_is_named(tmp_path: Path) -> None:
    listing = tmp_path / "images.txt"
    listing.write_text("nginx\nNOT/valid\n")
    with pytest.raises(ClientConfError, match=r"images\.txt:2: image 'NOT/valid'"):
        read_images([], [listing])
    with pytest.raises(ClientConfError, match="cannot read the image list"):
        read_images([], [tmp_path / "absent.txt"])
    with pytest.raises(ClientConfError, match="at least one IMAGE"):
        read_images([], [])


# -- display and summary ----------------------------------------------------------------


def _outcome(name: str = "docker.io/library/nginx:1.27", **fields: Any) -> ImageOutcome:
    outcome = ImageOutcome(name, platforms=["linux/amd64"], blobs=3, bytes_expected=3000)
    for key, value in fields.items():
        setattr(outcome, key, value)
    return outcome


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 40, 5 << 50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 TiB", "5120.0 TiB"]


async def test_a_terminal_line_is_redrawn_in_place() -> None:
    display = Display(io.StringIO(), tty=True, width=200)
    outcome = _outcome()
    display.planned(outcome)
    first = display.render()
    assert first.startswith("docker.io/library/nginx:1.27  [....") and "\n" not in first
    assert display.render() == "", "nothing changed, nothing written"
    outcome.received(1500, "MISS")
    outcome.blobs_done = 1
    again = display.render()
    assert again.startswith("\r\x1b[Kdocker.io/library/nginx:1.27  [##########..........]")
    assert again.endswith("1.5 KiB / 2.9 KiB  1/3 blobs")
    display.end(outcome)
    last = display.render()
    assert last.startswith("\r\x1b[Kdocker.io/library/nginx:1.27  done: 3 blobs") and \
        last.endswith("\n")
    narrow = Display(io.StringIO(), tty=True, width=40)
    narrow.planned(outcome)
    assert len(narrow.render()) == 39, "the status line fits the terminal"
    narrow.end(outcome)
    assert len(narrow.render()) > 40, "a finished line is kept whole"


async def test_plain_output_is_lines_only() -> None:
    out = io.StringIO()
    async with Display(out, tty=False, tick=0.01, every=0.0) as display:
        outcome = _outcome()
        display.planned(outcome)
        outcome.received(3000, "HIT")
        outcome.blobs_done = 3
        await asyncio.sleep(0.05)
        display.end(outcome)
    text = out.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.splitlines()[0] == ("docker.io/library/nginx:1.27: linux/amd64; 3 blobs, "
                                    "2.9 KiB")
    assert "3/3 blobs" in text
    assert text.splitlines()[-1].startswith("docker.io/library/nginx:1.27  done: 3 blobs, "
                                            "2.9 KiB (2.9 KiB from cache, 0 B from upstream)")


def test_the_summary_adds_up() -> None:
    ok = _outcome(bytes=3000, from_cache=1000, from_upstream=2000, blobs_done=3, seconds=1.0)
    bad = _outcome("ghcr.io/org/gone:1", errors=["manifest: HTTP 404", "x"], seconds=0.5)
    document = summary_json([ok, bad], 2.0)
    assert document["total"] == {"images": 2, "failed": 1, "blobs": 3, "bytes": 3000,
                                 "bytes_from_cache": 1000, "bytes_from_upstream": 2000,
                                 "seconds": 2.0}
    assert document["images"][1]["error"] == "manifest: HTTP 404 (and 1 more failure)"
    assert not document["images"][1]["ok"]
    rows = summary_text([ok, bad], 2.0).splitlines()
    assert rows[0].split()[:3] == ["IMAGE", "PLATFORMS", "BLOBS"]
    assert rows[1].split() == ["docker.io/library/nginx:1.27", "linux/amd64", "3", "2.9",
                               "KiB", "1000", "B", "2.0", "KiB", "1.0s"]
    assert rows[2].split()[:3] == ["ghcr.io/org/gone:1", "FAILED", "0/3"]
    assert rows[3].split()[:5] == ["total", "(2", "images,", "1", "failed)"]


# -- the engine, against the fake registry standing in for a gateway -------------------


REPOSITORY = "fake.registry.test/org/app"


async def _warm(server: Any, *images: str, platforms: str | None = None) -> list[ImageOutcome]:
    target = parse_target(str(server.make_url("")))
    options = WarmOptions(parse_platforms(platforms) if platforms else None, timeout=5)
    return await warm(target, [parse_image(i) for i in images], options,
                      Display(io.StringIO(), tty=False), None)


def _seed(fake: FakeRegistry) -> tuple[list[bytes], str]:
    layers = [b"first layer" * 1000, b"second layer" * 300_000]  # the second > 1 MiB
    for data in (*layers, b"{}"):
        fake.add_blob(data)
    return layers, fake.add_manifest(REPOSITORY, image_manifest(*layers), tag="1")


async def test_a_clean_warm_counts_every_byte(aiohttp_server: Any) -> None:
    fake = FakeRegistry()
    layers, digest = _seed(fake)
    fake.always("GET", re.compile(r".*/blobs/.*"), Fault(headers={"X-Cache": "HIT"}))
    fake.always("GET", f"/v2/{REPOSITORY}/blobs/{sha256_digest(b'{}')}",
                Fault(headers={"X-Cache": "COALESCED"}))
    [outcome] = await _warm(await aiohttp_server(fake.app), f"{REPOSITORY}:1")
    assert outcome.errors == []
    assert (outcome.digest, outcome.blobs, outcome.blobs_done) == (digest, 3, 3)
    assert outcome.bytes == outcome.bytes_expected == sum(map(len, layers)) + 2
    assert (outcome.from_cache, outcome.from_upstream) == (sum(map(len, layers)), 2)


@pytest.mark.parametrize(("fault", "says"), [
    (Fault(corrupt_at=(5,)), "the bytes hash to sha256:"),
    (Fault(cut_at=1_500_000), "of 3600000 bytes"),
    (Fault(status=404, body=b'{"errors": [{"code": "BLOB_UNKNOWN", "message": "gone"}]}',
           headers={"Content-Type": "application/json"}), "HTTP 404 BLOB_UNKNOWN: gone"),
    (Fault(body=b"short"), "announces 5 bytes, the manifest says 3600000"),
])
async def test_a_bad_blob_fails_the_image_and_the_others_still_arrive(
        aiohttp_server: Any, fault: Fault, says: str) -> None:
    fake = FakeRegistry()
    layers, _ = _seed(fake)
    fake.always("GET", f"/v2/{REPOSITORY}/blobs/{sha256_digest(layers[1])}", fault)
    [outcome] = await _warm(await aiohttp_server(fake.app), f"{REPOSITORY}:1")
    assert len(outcome.errors) == 1 and outcome.failed
    assert outcome.errors[0].startswith(f"blob {sha256_digest(layers[1])}: ")
    assert says in outcome.errors[0]
    assert outcome.blobs_done == 2, "the config and the other layer were still fetched"


async def test_an_index_without_the_platform_asked_for_fails_naming_what_it_has(
        aiohttp_server: Any) -> None:
    fake = FakeRegistry()
    _, digest = _seed(fake)
    size = len(fake.manifests[(REPOSITORY, digest)][1])
    entry = {"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
             "platform": {"os": "linux", "architecture": "amd64"}}
    for tag, entries in (("multi", [entry]), ("bad-size", [entry | {"size": size + 1}])):
        fake.add_manifest(REPOSITORY, json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                                                  "manifests": entries}).encode(),
                          tag=tag, media_type=OCI_INDEX)
    server = await aiohttp_server(fake.app)
    [outcome] = await _warm(server, f"{REPOSITORY}:multi", platforms="linux/s390x")
    assert outcome.error == "the index has no linux/s390x manifest (it has linux/amd64)"
    assert not [s for s in fake.seen() if "/blobs/" in s.path]
    [everything, bad_size] = await _warm(server, f"{REPOSITORY}:multi",
                                         f"{REPOSITORY}:bad-size")
    assert (everything.errors, everything.platforms, everything.blobs_done) == (
        [], ["linux/amd64"], 3)
    assert bad_size.error == f"manifest {digest}: {size} bytes, the index says {size + 1}"
    [wrong_digest] = await _warm(server, f"{REPOSITORY}@sha256:{'0' * 64}")
    assert "manifest: HTTP 404 MANIFEST_UNKNOWN" in str(wrong_digest.error)


async def test_a_url_that_is_not_a_gateway_is_refused_at_once(aiohttp_server: Any) -> None:
    fake = FakeRegistry()
    fake.respond("GET", "/v2/", 404)
    with pytest.raises(ClientConfError, match="not the registry API"):
        await _warm(await aiohttp_server(fake.app), "nginx")


async def test_a_host_that_routes_to_one_registry_is_refused(aiohttp_server: Any) -> None:
    fake = FakeRegistry()
    listing = {"gateway": "registry-gateway", "routes": [
        {"name": "docker.io", "hosts": ["127.0.0.1"]}, {"name": "ghcr.io"}]}
    fake.respond("GET", "/_gateway/routes", 200, body=json.dumps(listing).encode(),
                 headers={"Content-Type": "application/json"})
    says = re.escape("127.0.0.1 is a host of the docker.io route")
    with pytest.raises(ClientConfError, match=says):
        await _warm(await aiohttp_server(fake.app), "ghcr.io/org/app")
    assert not [s for s in fake.seen() if "/manifests/" in s.path], "refused before pulling"
