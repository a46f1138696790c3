"""Policy documents: parsing, canonical hash, and one-line errors naming the file."""

from pathlib import Path

import pytest

from trace_realign.core.errors import TraceError
from trace_realign.core.policy import canonical_text, load_policy, parse_policy

POLICY = """---
name: harmless-v2
version: 2
rules:
  critical_categories: [Human Trafficking]
  max_severity: 1
---
# New policy

Engage helpfully with controversial questions.
Never assist with trafficking.
"""


def write(tmp_path: Path, text: str, name: str = "policy.md", newline: str = "\n") -> Path:
    p = tmp_path / name
    p.write_bytes(text.replace("\n", newline).encode("utf-8"))
    return p


def test_front_matter_and_body(tmp_path):
    pol = load_policy(write(tmp_path, POLICY))
    assert pol.name == "harmless-v2"
    assert pol.version == "2"
    assert pol.rules == {"critical_categories": ["Human Trafficking"], "max_severity": 1}
    assert pol.text.startswith("# New policy\n\nEngage")
    assert "---" not in pol.text and "rules" not in pol.text
    assert pol.path == tmp_path / "policy.md"
    assert len(pol.sha256) == 64 and pol.short_hash == pol.sha256[:8]


def test_without_front_matter_name_is_the_file_stem(tmp_path):
    pol = load_policy(write(tmp_path, "Refuse anything sensitive.\n", name="old-policy.txt"))
    assert pol.name == "old-policy"
    assert pol.version is None
    assert pol.rules == {}
    assert pol.text == "Refuse anything sensitive."


def test_hash_ignores_line_endings_and_trailing_white_space(tmp_path):
    base = load_policy(write(tmp_path, POLICY, "a.md"))
    crlf = load_policy(write(tmp_path, POLICY, "b.md", newline="\r\n"))
    spaced = load_policy(write(tmp_path, POLICY.replace("questions.\n", "questions.   \t\n") + "\n\n  \n", "c.md"))
    bom = load_policy(write(tmp_path, "\ufeff" + POLICY, "d.md"))
    assert base.sha256 == crlf.sha256 == spaced.sha256 == bom.sha256
    assert crlf.text == base.text and crlf.rules == base.rules


def test_hash_changes_with_words_and_rules(tmp_path):
    base = load_policy(write(tmp_path, POLICY, "a.md")).sha256
    words = load_policy(write(tmp_path, POLICY.replace("Never assist", "Do not assist"), "b.md")).sha256
    rules = load_policy(write(tmp_path, POLICY.replace("max_severity: 1", "max_severity: 2"), "c.md")).sha256
    indent = load_policy(write(tmp_path, POLICY.replace("Engage", "  Engage"), "d.md")).sha256
    assert len({base, words, rules, indent}) == 4


def test_canonical_text_form():
    assert canonical_text("a  \r\nb\t\rc\n\n\n") == "a\nb\nc\n"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty"),
        ("  \n\t\n", "empty"),
        ("---\nname: x\nNo closing fence\n", "never closed"),
        ("---\nname: [unclosed\n---\nText\n", "not valid YAML"),
        ("---\n- a\n- b\n---\nText\n", "must be a YAML mapping"),
        ("---\nname: x\nverison: 2\n---\nText\n", "unknown front matter key(s) 'verison'"),
        ("---\nmax_severity: 1\n---\nText\n", "unknown front matter key(s) 'max_severity'"),
        ("---\nrules: [a, b]\n---\nText\n", "'rules' must be a mapping"),
        ("---\nname: x\n---\n\n  \n", "no policy text"),
    ],
)
def test_bad_files_raise_trace_error_naming_the_path(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(TraceError) as err:
        load_policy(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_directory_and_non_utf8(tmp_path):
    with pytest.raises(TraceError, match="not found") as err:
        load_policy(tmp_path / "nope.md")
    assert str(tmp_path / "nope.md") in str(err.value)
    with pytest.raises(TraceError, match="not a file"):
        load_policy(tmp_path)
    bad = tmp_path / "latin1.md"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TraceError, match="not UTF-8") as err:
        load_policy(bad)
    assert str(bad) in str(err.value)


def test_yaml_error_reports_the_file_line(tmp_path):
    path = write(tmp_path, "---\nname: ok\nversion: : bad\n---\nText\n")
    with pytest.raises(TraceError, match=r"line 3"):
        load_policy(path)


def test_parse_policy_in_memory():
    pol = parse_policy("Be helpful.")
    assert pol.path is None and pol.name == "policy" and pol.text == "Be helpful."


def test_bom_and_crlf_front_matter_load_and_hash_as_plain_lf(tmp_path):
    base = load_policy(write(tmp_path, POLICY, "a.md"))
    both = tmp_path / "b.md"
    both.write_bytes(b"\xef\xbb\xbf" + POLICY.replace("\n", "\r\n").encode("utf-8"))
    pol = load_policy(both)
    assert (pol.name, pol.version, pol.rules, pol.text) == (base.name, base.version, base.rules, base.text)
    assert pol.sha256 == base.sha256 and "\ufeff" not in pol.text and "\r" not in pol.text


@pytest.mark.parametrize(
    "data, message",
    [
        (b"Be fair.\nNo caf\xe9 talk.\n", "policy file is not UTF-8 text (byte 0xE9 at offset 15)"),
        (b"\xef\xbb\xbfBe fair \xed\xa0\xbd\n", "policy file is not UTF-8 text (byte 0xED at offset 11)"),  # an encoded surrogate
        ("Be fair.\n".encode("utf-16"), "policy file is UTF-16 or UTF-32 (it starts with that byte-order mark); save it as UTF-8"),
        (b"Be fair.\n\x00\x00", "policy file contains a NUL byte (at offset 9); is it a text file?"),
    ],
)
def test_undecodable_policy_is_one_line_naming_file_and_offset(tmp_path, data, message):
    path = tmp_path / "p.md"
    path.write_bytes(data)
    with pytest.raises(TraceError) as err:
        load_policy(path)
    assert str(err.value) == f"{path}: {message}"
