"""reference.py: repository names, tags and digests by the OCI grammar."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import RegistryError
from gateway.reference import (
    NAME_MAX,
    NAME_RE,
    TAG_RE,
    Digest,
    Reference,
    parse_digest,
    validate_name,
    validate_tag,
)

SHA = "sha256:" + hashlib.sha256(b"x").hexdigest()
SHA512 = "sha512:" + hashlib.sha512(b"x").hexdigest()


# ------------------------------------------------------------------- names


@pytest.mark.parametrize("name", [
    "nginx", "library/nginx", "a", "0", "a/b/c/d/e", "my-org/my_image", "a__b", "a---b",
    "a.b.c", "ghcr.io/owner/img", "x" * NAME_MAX, "k8s.gcr.io/pause", "a1/b2.c3_d4-e5",
])
def test_valid_names_are_returned_unchanged(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", [
    "", "Nginx", "UPPER/case", "-lead", "trail-", "a//b", "/a", "a/", "a_.b", "a___b",
    "a..b", ".a", "a.", "a b", "a:b", "a@b", "ñ", "a/../b", "a\nb", "nginx\n", "a/-b",
    "a_", "_a", "x" * (NAME_MAX + 1),
])
def test_invalid_names_are_name_invalid_400(name: str) -> None:
    with pytest.raises(RegistryError) as caught:
        validate_name(name)
    assert caught.value.code == "NAME_INVALID"
    assert caught.value.status == 400


def test_long_name_error_is_short_and_says_the_limit() -> None:
    with pytest.raises(RegistryError) as caught:
        validate_name("a" * 10_000)
    assert str(NAME_MAX) in caught.value.message
    assert len(caught.value.body()) < 400  # the 10 KB name is not echoed back


def test_bad_name_message_truncates_long_input() -> None:
    with pytest.raises(RegistryError) as caught:
        validate_name("B" * 200)
    assert len(caught.value.message) < 200


_alnum = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def _component(draw: st.DrawFn) -> str:
    parts = [draw(_alnum)]
    for _ in range(draw(st.integers(0, 3))):
        parts += [draw(_separator), draw(_alnum)]
    return "".join(parts)


_names = st.lists(_component(), min_size=1, max_size=6).map("/".join).filter(
    lambda n: len(n) <= NAME_MAX)


@given(_names)
def test_every_grammatical_name_round_trips(name: str) -> None:
    assert NAME_RE.fullmatch(name)
    assert validate_name(name) == name


@given(st.text(max_size=300))
def test_random_names_raise_only_registry_errors(name: str) -> None:
    try:
        assert validate_name(name) == name
    except RegistryError as exc:
        assert exc.code == "NAME_INVALID" and exc.status == 400


# -------------------------------------------------------------------- tags


@pytest.mark.parametrize("tag", ["latest", "v1.2.3", "_x", "A-b_c.d", "1", "x" * 128])
def test_valid_tags(tag: str) -> None:
    assert validate_tag(tag) == tag
    assert str(Reference.parse(tag)) == tag
    assert Reference.parse(tag).digest is None


@pytest.mark.parametrize("tag", ["", "-x", ".x", "x" * 129, "a/b", "a b", "tag\n", "ümlaut", "a+b"])
def test_invalid_tags_are_tag_invalid_400(tag: str) -> None:
    with pytest.raises(RegistryError) as caught:
        Reference.parse(tag)
    assert (caught.value.code, caught.value.status) == ("TAG_INVALID", 400)


@given(st.from_regex(TAG_RE, fullmatch=True))
def test_every_grammatical_tag_round_trips(tag: str) -> None:
    assert validate_tag(tag) == tag


# ----------------------------------------------------------------- digests


@pytest.mark.parametrize("value", [SHA, SHA512])
def test_digests_parse_and_print_back(value: str) -> None:
    digest = parse_digest(value)
    assert str(digest) == value
    assert digest == Digest(value.split(":")[0], value.split(":")[1])
    ref = Reference.parse(value)
    assert ref.digest == digest and ref.tag is None and str(ref) == value


@pytest.mark.parametrize("value", [
    "sha256:", "sha256:abc", SHA.upper(), SHA[:-1], SHA + "0", "sha384:" + "a" * 96,
    "md5:" + "a" * 32, "sha256:" + "g" * 64, "sha512:" + "a" * 64, "sha256" + SHA[6:].replace(
        ":", ""), " " + SHA, SHA + "\n", "sha256:" + "a" * 1000,
])
def test_invalid_digests_are_digest_invalid_400(value: str) -> None:
    with pytest.raises(RegistryError) as caught:
        parse_digest(value)
    assert (caught.value.code, caught.value.status) == ("DIGEST_INVALID", 400)
    assert len(caught.value.message) < 200


def test_a_reference_with_a_colon_is_a_digest_not_a_tag() -> None:
    with pytest.raises(RegistryError) as caught:
        Reference.parse("v1:2")
    assert caught.value.code == "DIGEST_INVALID"


@given(st.sampled_from(["sha256", "sha512"]), st.data())
def test_every_well_formed_digest_round_trips(algorithm: str, data: st.DataObject) -> None:
    length = 64 if algorithm == "sha256" else 128
    hex_part = data.draw(st.text("0123456789abcdef", min_size=length, max_size=length))
    value = f"{algorithm}:{hex_part}"
    assert str(parse_digest(value)) == value


@given(st.text(max_size=200))
def test_random_references_raise_only_registry_errors(value: str) -> None:
    for parse in (parse_digest, validate_tag, Reference.parse):
        try:
            parse(value)
        except RegistryError as exc:
            assert exc.status == 400
            assert exc.code in ("DIGEST_INVALID", "TAG_INVALID")
            assert exc.body().startswith(b'{"errors": [')
