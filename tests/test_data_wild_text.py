"""Data text as it comes from the wild: encodings, byte-level oddities and typed fields read from
text formats, in every supported format (JSONL, JSON, CSV, Parquet, Hugging Face datasets).

Each row either loads with its text intact (checked byte for byte) or gets one line naming the
file, the row and the field, and is skipped and counted under ``on_invalid="skip"``."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trace_realign.core.data import (
    iter_rows,
    load_pairs,
    make_pair_id,
    pairs_to_table,
    parse_bool,
    parse_int,
    table_to_pairs,
)
from trace_realign.core.errors import DataError

BOM = b"\xef\xbb\xbf"
GOOD = {"prompt": "What is a tariff?", "chosen": "A tax on imports.", "rejected": "No idea."}
GOOD2 = {"prompt": "What is inflation?", "chosen": "Rising prices.", "rejected": "Ask later."}


def jsonl_bytes(*lines: bytes, newline: bytes = b"\n") -> bytes:
    return newline.join(lines) + newline


def line(row: dict) -> bytes:
    return json.dumps(row).encode("utf-8")


def csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def csv_bytes(header: list[str], rows: list[list[bytes]], newline: bytes = b"\r\n") -> bytes:
    out = [b",".join(h.encode() for h in header)]
    out += [b",".join(cells) for cells in rows]
    return newline.join(out) + newline


def q(text: str | bytes) -> bytes:
    """A quoted CSV cell from text or raw bytes."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return b'"' + raw.replace(b'"', b'""') + b'"'


def write(tmp_path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def parquet(tmp_path, columns: dict, name: str = "d.parquet"):
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def not_utf8(values: list[bytes]) -> pa.Array:
    """A Parquet *string* column holding bytes that are not UTF-8 (pyarrow writes it unchecked)."""
    return pa.array(values, pa.binary()).view(pa.string())


def load_error(path, **kw) -> str:
    with pytest.raises(DataError) as err:
        load_pairs(path, **kw)
    message = str(err.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the example


def test_lone_surrogate_in_a_jsonl_response_is_named_and_skippable(tmp_path):
    path = write(
        tmp_path,
        "d.jsonl",
        jsonl_bytes(line(GOOD), b'{"prompt": "Tell me a joke", "chosen": "Sure! \\ud83d", "rejected": "No."}', line(GOOD2)),
    )
    message = load_error(path)
    assert message == f"{path}:line 2: 'chosen' contains a lone surrogate (U+D83D at character 7, not encodable as UTF-8)"
    res = load_pairs(path, on_invalid="skip")
    assert [p.chosen for p in res.pairs] == [GOOD["chosen"], GOOD2["chosen"]]
    assert res.rows_read == 3 and res.skipped == {"'chosen' contains a lone surrogate": 1}
    # What was loaded can be written as Parquet (the crash used to come from encoding the text).
    assert table_to_pairs(pairs_to_table(res.pairs)) == res.pairs


def test_lone_surrogates_in_every_used_field_are_named(tmp_path):
    rows = [
        {"prompt": "\udc00start", "chosen": "c", "rejected": "r"},
        {"prompt": [{"role": "user", "content": "hi \ud800"}], "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"source": "x\udfff"}},
        {"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"k\ud83d": 1}},
        {"prompt": "p", "chosen": "c", "rejected": "r", "rejected_annotations": {"note": ["ok", "\ud83d"]}},
        {"prompt": "p", "chosen": "\ude00\ud83d", "rejected": "r"},  # a pair in the wrong order is two lone halves
    ]
    path = write(tmp_path, "d.jsonl", jsonl_bytes(line(GOOD), *[line(r) for r in rows]))
    res = load_pairs(path, on_invalid="skip")
    assert len(res.pairs) == 1
    assert res.skipped == {
        "'prompt' contains a lone surrogate": 1,
        "'prompt[0].content' contains a lone surrogate": 1,
        "'metadata.source' contains a lone surrogate": 1,
        "'metadata key' contains a lone surrogate": 1,
        "'rejected_annotations.note[1]' contains a lone surrogate": 1,
        "'chosen' contains a lone surrogate": 1,
    }


def test_make_pair_id_refuses_a_lone_surrogate_in_one_line():
    with pytest.raises(DataError, match=r"lone surrogate \(U\+D83D\)"):
        make_pair_id("p", "c\ud83d", "r")


# --------------------------------------------------------------------------- valid surrogate pairs and emoji


def test_a_surrogate_pair_written_as_two_json_escapes_is_one_emoji(tmp_path):
    raw = b'{"prompt": "Smile \\ud83d\\ude00", "chosen": "\\ud83d\\ude00 back", "rejected": "no"}'
    for name, data in (("d.jsonl", raw + b"\n"), ("d.json", b"[" + raw + b"]")):
        pair = load_pairs(write(tmp_path, name, data)).pairs[0]
        assert pair.prompt == "Smile \U0001f600" and pair.chosen == "\U0001f600 back"
        assert len(pair.chosen) == 6


def test_emoji_in_csv_and_parquet_load_intact(tmp_path):
    text = "Smile \U0001f600, caf\u00e9, \u4e2d\u6587"
    path = write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected"], [[q("p"), q(text), q("r")]]))
    assert load_pairs(path).pairs[0].chosen == text
    path = parquet(tmp_path, {"prompt": ["p"], "chosen": [text], "rejected": ["r"]})
    assert load_pairs(path).pairs[0].chosen == text


# --------------------------------------------------------------------------- byte-order marks


def test_bom_at_the_start_of_a_jsonl_json_or_csv_file_is_not_data(tmp_path):
    jsonl = write(tmp_path, "d.jsonl", BOM + jsonl_bytes(line(GOOD), line(GOOD2)))
    as_json = write(tmp_path, "d.json", BOM + json.dumps([GOOD, GOOD2]).encode())
    rows = [[q(r["prompt"]), q(r["chosen"]), q(r["rejected"])] for r in (GOOD, GOOD2)]
    as_csv = write(tmp_path, "d.csv", BOM + csv_bytes(["prompt", "chosen", "rejected"], rows))
    for path in (jsonl, as_json, as_csv):
        res = load_pairs(path)  # default columns: the first CSV header must be 'prompt', not '\ufeffprompt'
        assert [p.prompt for p in res.pairs] == [GOOD["prompt"], GOOD2["prompt"]], path
    _, first = next(iter_rows(as_csv))
    assert list(first) == ["prompt", "chosen", "rejected"]


def test_bom_on_a_later_jsonl_line_from_concatenated_files_is_dropped(tmp_path):
    path = write(tmp_path, "d.jsonl", BOM + line(GOOD) + b"\n" + BOM + line(GOOD2) + b"\n")
    assert [p.chosen for p in load_pairs(path).pairs] == [GOOD["chosen"], GOOD2["chosen"]]


def test_a_bom_inside_text_is_the_users_text(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl_bytes(line({"prompt": "p", "chosen": "\ufeffhello", "rejected": "r"})))
    assert load_pairs(path).pairs[0].chosen == "\ufeffhello"


@pytest.mark.parametrize("name", ["d.jsonl", "d.json", "d.csv"])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_or_utf32_file_is_one_line(tmp_path, name, encoding):
    text = {"d.jsonl": json.dumps(GOOD) + "\n", "d.json": json.dumps([GOOD]), "d.csv": "prompt,chosen,rejected\np,c,r\n"}[name]
    path = write(tmp_path, name, text.encode(encoding))  # Python writes the byte-order mark
    assert load_error(path) == f"{path}: the file is UTF-16 or UTF-32 (it starts with that byte-order mark); save it as UTF-8"


# --------------------------------------------------------------------------- invalid UTF-8


def test_invalid_utf8_in_one_jsonl_line_does_not_kill_the_others(tmp_path):
    bad = b'{"prompt": "p", "chosen": "caf\xe9 au lait", "rejected": "r"}'
    path = write(tmp_path, "d.jsonl", jsonl_bytes(line(GOOD), bad, line(GOOD2)))
    assert load_error(path) == f"{path}:line 2: 'chosen' is not valid UTF-8 (byte 0xE9 at offset 3)"
    res = load_pairs(path, on_invalid="skip")
    assert [p.chosen for p in res.pairs] == [GOOD["chosen"], GOOD2["chosen"]]
    assert res.skipped == {"'chosen' is not valid UTF-8": 1}


def test_invalid_utf8_in_a_column_the_pair_does_not_use_is_ignored(tmp_path):
    jsonl = write(tmp_path, "d.jsonl", jsonl_bytes(b'{"prompt": "p", "chosen": "c", "rejected": "r", "raw": "\xff\xfe"}'))
    as_csv = write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected", "raw"], [[b"p", b"c", b"r", b"\xff"]]))
    pq_path = parquet(tmp_path, {"prompt": ["p"], "chosen": ["c"], "rejected": ["r"], "raw": not_utf8([b"\xff"])})
    for path in (jsonl, as_csv, pq_path):
        assert [(p.prompt, p.chosen, p.rejected) for p in load_pairs(path).pairs] == [("p", "c", "r")], path


def test_invalid_utf8_in_a_json_item_names_the_item(tmp_path):
    data = b'[{"prompt": "p", "chosen": "c", "rejected": "r"},\n {"prompt": "p2", "chosen": "c2", "rejected": "bad \xc3("}]'
    path = write(tmp_path, "d.json", data)
    assert load_error(path) == f"{path}:item 2: 'rejected' is not valid UTF-8 (byte 0xC3 at offset 4)"
    res = load_pairs(path, on_invalid="skip")
    assert [p.chosen for p in res.pairs] == ["c"] and res.skipped == {"'rejected' is not valid UTF-8": 1}


def test_invalid_utf8_in_one_csv_row_keeps_the_rows_around_it(tmp_path):
    multi = "line one\r\nline two"  # a quoted field spanning lines before the bad row
    rows = [
        [q("p1"), q(multi), q("r1")],
        [q("p2"), q(b"Windows-1252 \x93quotes\x94"), q("r2")],
        [q("p3"), q("c3"), q("r3")],
    ]
    path = write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected"], rows))
    assert load_error(path) == f"{path}:row 2: 'chosen' is not valid UTF-8 (byte 0x93 at offset 13)"
    res = load_pairs(path, on_invalid="skip")
    assert [p.chosen for p in res.pairs] == [multi, "c3"] and res.rows_read == 3
    assert res.skipped == {"'chosen' is not valid UTF-8": 1}


def test_csv_header_that_is_not_utf8_is_one_line_for_the_file(tmp_path):
    path = write(tmp_path, "d.csv", b"prompt,chosen,rejected,caf\xe9\r\np,c,r,x\r\n")
    assert load_error(path) == f"{path}: CSV header column 4 is not valid UTF-8 text (b'caf\\xe9')"


def test_invalid_utf8_in_a_parquet_string_column_names_row_and_field(tmp_path):
    path = parquet(
        tmp_path,
        {"prompt": ["p1", "p2", "p3"], "chosen": not_utf8([b"c1", b"\xe9t\xe9", b"c3"]), "rejected": ["r1", "r2", "r3"]},
    )
    assert load_error(path) == f"{path}:row 2: 'chosen' is not valid UTF-8 (byte 0xE9 at offset 0)"
    res = load_pairs(path, on_invalid="skip")
    assert [p.chosen for p in res.pairs] == ["c1", "c3"] and res.skipped == {"'chosen' is not valid UTF-8": 1}


def test_invalid_utf8_nested_in_a_parquet_chat_prompt(tmp_path):
    content = not_utf8([b"hi", b"bad\xe9"])
    messages = pa.StructArray.from_arrays([pa.array(["user", "user"]), content], names=["role", "content"])
    prompt = pa.ListArray.from_arrays(pa.array([0, 1, 2], pa.int32()), messages)
    path = parquet(tmp_path, {"prompt": prompt, "chosen": ["a", "b"], "rejected": ["c", "d"]})
    assert load_error(path) == f"{path}:row 2: 'prompt[0].content' is not valid UTF-8 (byte 0xE9 at offset 3)"
    res = load_pairs(path, on_invalid="skip")
    assert [p.prompt for p in res.pairs] == [[{"role": "user", "content": "hi"}]]


def test_parquet_binary_columns_are_decoded_or_rejected_by_name(tmp_path):
    path = parquet(
        tmp_path,
        {
            "prompt": pa.array(["caf\u00e9?".encode(), b"p2"], pa.binary()),
            "chosen": pa.array(["cr\u00e8me \U0001f600".encode(), b"\xff\xfe"], pa.binary()),
            "rejected": ["r1", "r2"],
        },
    )
    assert load_error(path) == f"{path}:row 2: 'chosen' is not valid UTF-8 (byte 0xFF at offset 0)"
    res = load_pairs(path, on_invalid="skip")
    assert [(p.prompt, p.chosen) for p in res.pairs] == [("caf\u00e9?", "cr\u00e8me \U0001f600")]


def test_surrogates_encoded_as_bytes_are_invalid_utf8_in_csv_and_parquet(tmp_path):
    wtf8 = b"smile \xed\xa0\xbd"  # a lone surrogate written CESU/WTF-8 style: not UTF-8
    as_csv = write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected"], [[b"p", q(wtf8), b"r"], [b"p", b"c", b"r"]]))
    assert load_error(as_csv) == f"{as_csv}:row 1: 'chosen' is not valid UTF-8 (byte 0xED at offset 6)"
    pq_path = parquet(tmp_path, {"prompt": ["p", "p"], "chosen": not_utf8([wtf8, b"c"]), "rejected": ["r", "r"]})
    assert load_error(pq_path) == f"{pq_path}:row 1: 'chosen' is not valid UTF-8 (byte 0xED at offset 6)"
    for path in (as_csv, pq_path):
        assert [p.chosen for p in load_pairs(path, on_invalid="skip").pairs] == ["c"]


# --------------------------------------------------------------------------- NUL


def test_nul_in_text_rejects_the_row_in_every_format(tmp_path):
    nul = {"prompt": "p", "chosen": "half\x00way", "rejected": "r"}
    expected_reason = "'chosen' contains a NUL character"
    paths = {
        "jsonl": write(tmp_path, "d.jsonl", jsonl_bytes(line(GOOD), line(nul))),  # the \u0000 escape
        "json": write(tmp_path, "d.json", json.dumps([GOOD, nul]).encode()),
        # A raw NUL inside a JSON string (a control character taken literally) reaches the same check.
        "json-raw": write(tmp_path, "raw.json", b'[' + line(GOOD) + b', {"prompt": "p", "chosen": "half\x00way", "rejected": "r"}]'),
        "csv": write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected"], [[b"p", b"half\x00way", b"r"], [q(GOOD["prompt"]), q(GOOD["chosen"]), q(GOOD["rejected"])]])),
        "parquet": parquet(tmp_path, {"prompt": ["p", GOOD["prompt"]], "chosen": ["half\x00way", GOOD["chosen"]], "rejected": ["r", GOOD["rejected"]]}),
    }
    where = {"jsonl": "line 2", "json": "item 2", "json-raw": "item 2", "csv": "row 1", "parquet": "row 1"}
    for fmt, path in paths.items():
        assert load_error(path) == f"{path}:{where[fmt]}: 'chosen' contains a NUL character (at character 5)", fmt
        res = load_pairs(path, on_invalid="skip")
        assert [p.chosen for p in res.pairs] == [GOOD["chosen"]] and res.skipped == {expected_reason: 1}, fmt


def test_raw_nul_byte_outside_a_string_in_jsonl_is_one_skippable_line(tmp_path):
    path = write(tmp_path, "d.jsonl", jsonl_bytes(line(GOOD), b'{"prompt": "p",\x00 "chosen": "c", "rejected": "r"}', line(GOOD2)))
    assert load_error(path).startswith(f"{path}:line 2: invalid JSON")
    res = load_pairs(path, on_invalid="skip")
    assert len(res.pairs) == 2 and res.skipped == {"invalid JSON": 1}
    with pytest.raises(DataError, match="line 2: invalid JSON"):  # the public row reader still stops there
        list(iter_rows(path))


def test_nul_in_annotations_prompt_messages_and_hf_rows(tmp_path):
    import datasets

    rows = [
        GOOD,
        {"prompt": [{"role": "user\x00", "content": "x"}], "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": "c", "rejected": "r", "chosen_annotations": {"is_safe": True, "note": "a\x00"}},
    ]
    path = write(tmp_path, "d.jsonl", jsonl_bytes(*[line(r) for r in rows]))
    assert load_pairs(path, on_invalid="skip").skipped == {
        "'prompt[0].role' contains a NUL character": 1,
        "'chosen_annotations.note' contains a NUL character": 1,
    }
    folder = tmp_path / "hf"
    datasets.Dataset.from_list([GOOD, {"prompt": "p", "chosen": "c\x00", "rejected": "r"}]).save_to_disk(str(folder))
    message = load_error(folder, format="hf")
    assert message == f"{folder}[train]:row 2: 'chosen' contains a NUL character (at character 2)"
    assert len(load_pairs(folder, format="hf", on_invalid="skip").pairs) == 1


def test_hf_binary_column_that_is_not_utf8_is_rejected_by_name(tmp_path):
    import datasets

    folder = tmp_path / "hf"
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Value("binary"), "rejected": datasets.Value("string")})
    rows = [{"prompt": "p", "chosen": "ok \u00e9".encode(), "rejected": "r"}, {"prompt": "p2", "chosen": b"\xe9", "rejected": "r"}]
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    assert load_error(folder, format="hf") == f"{folder}[train]:row 2: 'chosen' is not valid UTF-8 (byte 0xE9 at offset 0)"
    assert [p.chosen for p in load_pairs(folder, format="hf", on_invalid="skip").pairs] == ["ok \u00e9"]


# --------------------------------------------------------------------------- line endings


def test_crlf_jsonl_loads_and_escaped_crlf_in_text_stays(tmp_path):
    row = {"prompt": "Two lines?", "chosen": "first\r\nsecond", "rejected": "one"}
    path = write(tmp_path, "d.jsonl", jsonl_bytes(line(GOOD), b"", line(row), newline=b"\r\n"))
    res = load_pairs(path)
    assert [p.chosen for p in res.pairs] == [GOOD["chosen"], "first\r\nsecond"]
    assert res.pairs[1].chosen.encode() == b"first\r\nsecond"


def test_jsonl_lines_split_only_at_line_feeds(tmp_path):
    # A raw CR, U+2028, U+2029 and NEL inside a JSON string are text, not line ends (str.splitlines
    # or universal-newline reading would cut the row there).
    text = "a\rb\u2028c\u2029d\u0085e"
    raw = b'{"prompt": "p", "chosen": "' + text.encode("utf-8") + b'", "rejected": "r"}'
    res = load_pairs(write(tmp_path, "d.jsonl", jsonl_bytes(raw, line(GOOD), newline=b"\r\n")))
    assert [p.chosen for p in res.pairs] == [text, GOOD["chosen"]] and res.rows_read == 2


def test_crlf_json_file_with_raw_control_characters_inside_strings(tmp_path):
    # Pretty-printed with CRLF, and a writer that put a raw CR LF and a tab inside a string.
    data = b'[\r\n  {"prompt": "p",\r\n   "chosen": "a\r\n\tb",\r\n   "rejected": "r\\r\\n"}\r\n]\r\n'
    pair = load_pairs(write(tmp_path, "d.json", data)).pairs[0]
    assert pair.chosen == "a\r\n\tb" and pair.rejected == "r\r\n"


def test_crlf_csv_keeps_crlf_and_lf_inside_quoted_fields_byte_for_byte(tmp_path):
    texts = ["windows\r\nline", "unix\nline", "old mac\rline", 'quote "inside", and comma']
    rows = [[q(f"p{i}"), q(t), q(f"r{i}")] for i, t in enumerate(texts)]
    for newline in (b"\r\n", b"\n"):
        path = write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected"], rows, newline=newline))
        res = load_pairs(path)
        assert [p.chosen for p in res.pairs] == texts
        assert [p.prompt for p in res.pairs] == ["p0", "p1", "p2", "p3"]  # no '\r' left on the last column
        assert [p.rejected for p in res.pairs] == ["r0", "r1", "r2", "r3"]


def test_crlf_text_survives_parquet_in_and_out(tmp_path):
    path = parquet(tmp_path, {"prompt": ["p"], "chosen": ["a\r\nb \U0001f600"], "rejected": ["r"]})
    pairs = load_pairs(path).pairs
    assert pairs[0].chosen == "a\r\nb \U0001f600"
    assert table_to_pairs(pairs_to_table(pairs)) == pairs


# --------------------------------------------------------------------------- typed fields: parsers


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (1, True), (0, False), (1.0, True), ("True", True), ("False", False), ("true", True),
     ("false", False), (" FALSE ", False), ("1", True), ("0", False), ("yes", True), ("No", False)],
)
def test_parse_bool_accepts(value, expected):
    assert parse_bool(value, "f:row 1", "flag") is expected


@pytest.mark.parametrize("value", [None, "", "maybe", "f", 2, -1, 0.5, float("nan"), [], {}, "None"])
def test_parse_bool_rejects_by_name(value):
    with pytest.raises(DataError) as err:
        parse_bool(value, "f:row 1", "is_safe")
    assert str(err.value).startswith("f:row 1: 'is_safe' must be a boolean (got ")


@pytest.mark.parametrize("value, expected", [(2, 2), ("2", 2), (" 3 ", 3), ("2.0", 2), (2.0, 2), ("-1", -1)])
def test_parse_int_accepts(value, expected):
    assert parse_int(value, "f:row 1", "n") == expected


@pytest.mark.parametrize("value", ["high", "", None, True, 2.5, "2.5", "\u0663", "1e3"])
def test_parse_int_rejects_by_name(value):
    with pytest.raises(DataError, match=r"^f:row 1: 'severity' must be an integer \(got "):
        parse_int(value, "f:row 1", "severity")
    with pytest.raises(DataError, match=r"'severity' must be an integer >= 0 \(got -1\)"):
        parse_int(-1, "f:row 1", "severity", minimum=0)


# --------------------------------------------------------------------------- typed fields: annotation columns

CSV_ANNOTATIONS = [
    # JSON with string values, as a spreadsheet or a careless export writes them.
    '{"is_safe": "False", "refusal": "no", "severity": "2", "harm_categories": {"Violence": "false", "Drugs": "1"},'
    ' "prompt_tags": "[\\"educational\\"]", "rater": "ann-3"}',
    # A pandas export of a dict column: the Python repr.
    "{'is_safe': True, 'refusal': 0, 'severity': 0.0, 'harm_categories': {'Violence': False, 'Drugs': None}, 'prompt_tags': ['law']}",
]
TYPED = [
    {"is_safe": False, "refusal": False, "severity": 2, "harm_categories": {"Violence": False, "Drugs": True},
     "prompt_tags": ["educational"], "rater": "ann-3"},
    {"is_safe": True, "refusal": False, "severity": 0, "harm_categories": {"Violence": False}, "prompt_tags": ["law"]},
]


def _assert_exact(ann: dict, expected: dict):
    assert ann == expected
    for key in ("is_safe", "refusal"):
        assert ann[key] is expected[key]  # the Python booleans, not the truthy text "False"
    assert type(ann["severity"]) is int
    assert all(type(v) is bool for v in ann["harm_categories"].values())


def test_csv_annotation_columns_are_parsed_to_their_types(tmp_path):
    rows = [[q(f"p{i}"), q("c"), q("r"), q(a), q('{"prompt_tags": "[\\"law\\", \\"ethics\\"]", "source": "x"}')] for i, a in enumerate(CSV_ANNOTATIONS)]
    path = write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected", "chosen_annotations", "metadata"], rows))
    pairs = load_pairs(path).pairs
    for pair, expected in zip(pairs, TYPED):
        _assert_exact(pair.chosen_annotations, expected)
        assert pair.rejected_annotations is None
        assert pair.metadata == {"prompt_tags": ["law", "ethics"], "source": "x"}


def test_jsonl_annotations_with_text_flags_are_parsed(tmp_path):
    row = {"prompt": "p", "chosen": "c", "rejected": "r",
           "chosen_annotations": {"is_safe": "True", "refusal": "1", "severity": "0", "harm_categories": '{"Drugs": "no"}'},
           "rejected_annotations": json.dumps({"is_safe": 0, "refusal": "False", "severity": 3, "extra": {"k": "False"}})}
    pair = load_pairs(write(tmp_path, "d.jsonl", jsonl_bytes(line(row)))).pairs[0]
    assert pair.chosen_annotations == {"is_safe": True, "refusal": True, "severity": 0, "harm_categories": {"Drugs": False}}
    assert pair.rejected_annotations == {"is_safe": False, "refusal": False, "severity": 3, "extra": {"k": "False"}}  # unknown keys unchanged
    assert pair.rejected_annotations["is_safe"] is False and pair.chosen_annotations["refusal"] is True


@pytest.mark.parametrize(
    "annotations, message",
    [
        ({"severity": "high"}, "'chosen_annotations.severity' must be an integer >= 0 (got 'high')"),
        ({"severity": -2}, "'chosen_annotations.severity' must be an integer >= 0 (got -2)"),
        ({"is_safe": "maybe"}, "'chosen_annotations.is_safe' must be a boolean (got 'maybe'; use true/false, 1/0 or yes/no)"),
        ({"refusal": 2}, "'chosen_annotations.refusal' must be a boolean (got 2;"),
        ({"harm_categories": {"Violence": "sometimes"}}, "'chosen_annotations.harm_categories.Violence' must be a boolean (got 'sometimes';"),
        ({"harm_categories": ["Violence"]}, "'chosen_annotations.harm_categories' must be a mapping of harm category to boolean"),
        ({"prompt_tags": "educational"}, "'chosen_annotations.prompt_tags' must be a list of text tags (got 'educational')"),
        ({"prompt_tags": ["ok", 3]}, "'chosen_annotations.prompt_tags' must be a list of text tags"),
        ("{not json", "'chosen_annotations' is not valid JSON"),
        ("[1, 2]", "'chosen_annotations' must be a mapping"),
    ],
)
def test_bad_typed_annotations_are_rejected_by_name(tmp_path, annotations, message):
    row = {"prompt": "p", "chosen": "c", "rejected": "r", "chosen_annotations": annotations}
    path = write(tmp_path, "d.jsonl", jsonl_bytes(line(GOOD), line(row)))
    assert load_error(path).startswith(f"{path}:line 2: {message}")
    res = load_pairs(path, on_invalid="skip")
    assert len(res.pairs) == 1 and sum(res.skipped.values()) == 1


def test_metadata_prompt_tags_are_typed_too(tmp_path):
    row = {"prompt": "p", "chosen": "c", "rejected": "r", "metadata": {"prompt_tags": "educational"}}
    path = write(tmp_path, "d.jsonl", jsonl_bytes(line(row)))
    assert load_error(path) == f"{path}:line 1: 'metadata.prompt_tags' must be a list of text tags (got 'educational')"


def test_metadata_value_that_is_not_json_is_rejected_by_name(tmp_path):
    import datetime

    path = parquet(tmp_path, {"prompt": ["p"], "chosen": ["c"], "rejected": ["r"],
                              "metadata": pa.array([{"at": datetime.datetime(2024, 1, 1)}])})
    assert load_error(path) == f"{path}:row 1: 'metadata.at' must be a JSON value (text, number, boolean, list or object), got datetime"


# --------------------------------------------------------------------------- typed fields: PKU-SafeRLHF

PKU_HEADER = ["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "response_0_harm_category",
              "response_1_harm_category", "response_0_severity_level", "response_1_severity_level", "better_response_id",
              "safer_response_id", "prompt_source", "response_0_source", "response_1_source"]


def pku_csv_row(i: int, safe0: str, safe1: str, cats0: str, cats1: str, sev0: str, sev1: str, better: str = "1", safer: str = "0") -> list[bytes]:
    cells = [f"prompt {i}", f"r0 {i}", f"r1 {i}", safe0, safe1, cats0, cats1, sev0, sev1, better, safer, "Alpaca3-70B", "Alpaca-7B", "Alpaca3-8B"]
    return [q(c) for c in cells]


def test_pku_csv_text_flags_are_never_truthy_by_accident(tmp_path):
    cats_json = '{"Violence": "False", "Cybercrime": "True"}'
    cats_repr = "{'Violence': False, 'Cybercrime': False}"
    rows = [
        # "False" is false: response 1 is the only safe one, although safer_response_id says 0.
        pku_csv_row(0, "False", "True", cats_json, cats_repr, "2", "0"),
        pku_csv_row(1, "0", "1", cats_json, cats_repr, "1.0", "0", better="0", safer="1"),
        pku_csv_row(2, "no", "no", cats_json, cats_json, "3", "1", safer="1"),  # neither safe: safer_response_id decides
        pku_csv_row(3, "true", "yes", cats_repr, cats_repr, "0", "0", safer="0"),
    ]
    path = write(tmp_path, "pku.csv", csv_bytes(PKU_HEADER, rows))
    pairs = load_pairs(path, adapter="pku_saferlhf").pairs
    assert [p.chosen for p in pairs] == ["r1 0", "r1 1", "r1 2", "r0 3"]
    p = pairs[0]
    assert p.chosen_annotations == {"is_safe": True, "harm_categories": {"Violence": False, "Cybercrime": False}, "severity": 0}
    assert p.rejected_annotations == {"is_safe": False, "harm_categories": {"Violence": False, "Cybercrime": True}, "severity": 2}
    assert p.rejected_annotations["is_safe"] is False and p.chosen_annotations["is_safe"] is True
    assert p.metadata["safer_response_id"] == 0 and p.metadata["better_response_id"] == 1 and p.metadata["chosen_response_id"] == 1
    assert pairs[1].metadata["better_response_id"] == 0 and pairs[1].rejected_annotations["severity"] == 1
    assert pairs[2].rejected_annotations == {"is_safe": False, "harm_categories": {"Violence": False, "Cybercrime": True}, "severity": 3}
    assert p.metadata["prompt_source"] == "Alpaca3-70B" and p.metadata["chosen_source"] == "Alpaca3-8B"


def test_pku_jsonl_with_string_flags(tmp_path):
    row = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": "True", "is_response_1_safe": "False",
           "response_0_harm_category": {"Drugs": "false"}, "response_1_harm_category": '{"Drugs": "true"}',
           "response_0_severity_level": "0", "response_1_severity_level": 2, "safer_response_id": "1", "better_response_id": 1}
    pair = load_pairs(write(tmp_path, "pku.jsonl", jsonl_bytes(line(row))), adapter="pku_saferlhf").pairs[0]
    assert (pair.chosen, pair.rejected) == ("a", "b")
    assert pair.chosen_annotations == {"is_safe": True, "harm_categories": {"Drugs": False}, "severity": 0}
    assert pair.rejected_annotations == {"is_safe": False, "harm_categories": {"Drugs": True}, "severity": 2}


def test_pku_without_severity_or_categories_gets_no_made_up_annotation(tmp_path):
    # PKU-SafeRLHF's first release has neither column; an empty CSV cell is the same.
    rows = [[q("p"), q("a"), q("b"), q("True"), q("False"), q("1")]]
    path = write(tmp_path, "pku.csv", csv_bytes(["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe", "safer_response_id"], rows))
    pair = load_pairs(path, adapter="pku_saferlhf").pairs[0]
    assert pair.chosen_annotations == {"is_safe": True} and pair.rejected_annotations == {"is_safe": False}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"response_0_severity_level": "high"}, "'response_0_severity_level' must be an integer >= 0 (got 'high')"),
        ({"is_response_1_safe": "maybe"}, "'is_response_1_safe' must be a boolean (got 'maybe'"),
        ({"is_response_0_safe": None}, "'is_response_0_safe' must be a boolean (got None"),
        ({"safer_response_id": "2"}, "'safer_response_id' must be 0 or 1 (got '2')"),
        ({"safer_response_id": "first"}, "'safer_response_id' must be 0 or 1 (got 'first')"),
        ({"better_response_id": "1.5"}, "'better_response_id' must be 0 or 1 (got '1.5')"),
        ({"response_1_harm_category": "Violence"}, "'response_1_harm_category' is not valid JSON"),
        ({"response_1_harm_category": '{"Violence": "often"}'}, "'response_1_harm_category.Violence' must be a boolean (got 'often'"),
        ({"response_1": "ends badly \ud83d"}, "'response_1' contains a lone surrogate"),
    ],
)
def test_pku_bad_typed_fields_are_named_and_skippable(tmp_path, change, message):
    base = {"prompt": "p", "response_0": "a", "response_1": "b", "is_response_0_safe": True, "is_response_1_safe": True,
            "response_0_harm_category": {"Violence": False}, "response_1_harm_category": {"Violence": False},
            "response_0_severity_level": 0, "response_1_severity_level": 0, "safer_response_id": 0, "better_response_id": 0}
    good = dict(base, prompt="fine")
    path = write(tmp_path, "pku.jsonl", jsonl_bytes(line(good), line({**base, **change})))
    assert load_error(path, adapter="pku_saferlhf").startswith(f"{path}:line 2: {message}")
    res = load_pairs(path, adapter="pku_saferlhf", on_invalid="skip")
    assert [p.prompt for p in res.pairs] == ["fine"] and sum(res.skipped.values()) == 1


# --------------------------------------------------------------------------- CSV chat prompts


def test_csv_prompt_cell_holding_a_json_message_list_is_a_conversation(tmp_path):
    chat = '[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]'
    texts = ["[citation needed] Is this true?", '["just", "a", "list"]', '[{"role": "user"}]', "[1, 2] + [3]"]
    rows = [[q(chat), q("c0"), q("r0")]] + [[q(t), q(f"c{i}"), q(f"r{i}")] for i, t in enumerate(texts, start=1)]
    pairs = load_pairs(write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected"], rows))).pairs
    assert pairs[0].prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    assert [p.prompt for p in pairs[1:]] == texts  # anything else is text, as written
    # In JSONL a string is always text: a conversation is a real list there.
    pair = load_pairs(write(tmp_path, "d.jsonl", jsonl_bytes(line({"prompt": chat, "chosen": "c", "rejected": "r"})))).pairs[0]
    assert pair.prompt == chat


def test_csv_chat_prompt_with_a_lone_surrogate_escape_is_rejected(tmp_path):
    chat = '[{"role": "user", "content": "Hi \\ud83d"}]'
    path = write(tmp_path, "d.csv", csv_bytes(["prompt", "chosen", "rejected"], [[q(chat), b"c", b"r"]]))
    assert load_error(path).startswith(f"{path}:row 1: 'prompt[0].content' contains a lone surrogate (U+D83D at character 4")
