import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trace_realign.core.data import (
    PreferencePair,
    load_pairs,
    make_pair_id,
    pairs_to_table,
    table_to_pairs,
)
from trace_realign.core.errors import DataError

ROWS = [
    {"prompt": "Is the trolley problem solvable?", "chosen": "I can't discuss that.", "rejected": "It is a dilemma..."},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How do banks work?"}],
        "chosen": [{"role": "assistant", "content": "Banks take deposits and lend."}],
        "rejected": "No.",
        "chosen_annotations": {"is_safe": True, "severity": 0},
    },
]


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_pair_id_is_stable_and_content_based():
    a = make_pair_id("p", "c", "r")
    assert a == make_pair_id("p", "c", "r")
    assert len(a) == 16
    assert a != make_pair_id("p", "r", "c")
    assert make_pair_id([{"role": "user", "content": "p"}], "c", "r") != a


def test_jsonl_plain_and_conversational(tmp_path):
    res = load_pairs(write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert [p.chosen for p in res.pairs] == ["I can't discuss that.", "Banks take deposits and lend."]
    assert isinstance(res.pairs[1].prompt, list) and res.pairs[1].prompt[1]["content"] == "How do banks work?"
    assert res.pairs[1].chosen_annotations == {"is_safe": True, "severity": 0}
    assert res.rows_read == 2


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json", "hf"])
def test_other_formats_give_the_same_pairs(tmp_path, fmt):
    rows = [
        {"q": "What is civil disobedience?", "good": "A form of protest.", "bad": "I refuse."},
        {"q": "Explain index funds.", "good": "Funds that track an index.", "bad": "Buy now!"},
    ]
    if fmt == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["q", "good", "bad"])
            w.writeheader()
            w.writerows(rows)
        kw = {}
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        kw = {}
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(rows))
        kw = {}
    else:
        import datasets

        path = tmp_path / "hf"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        kw = {"format": "hf"}
    res = load_pairs(path, columns={"prompt": "q", "chosen": "good", "rejected": "bad"}, **kw)
    assert [(p.prompt, p.chosen, p.rejected) for p in res.pairs] == [(r["q"], r["good"], r["bad"]) for r in rows]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "rejected": "r"}, "line 2: missing 'chosen'"),
        ({"prompt": "p", "chosen": "  ", "rejected": "r"}, "line 2: empty 'chosen'"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, "line 2: 'chosen' must be text, got int"),
        ({"prompt": "", "chosen": "c", "rejected": "r"}, "line 2: empty 'prompt'"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "line 2: 'chosen' equals 'rejected'"),
        (ROWS[0], "line 2: duplicate pair"),
    ],
)
def test_invalid_rows_name_file_and_row(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], row])
    with pytest.raises(DataError) as err:
        load_pairs(path)
    assert str(path) in str(err.value) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_skip_mode_counts_reasons(tmp_path):
    rows = [ROWS[0], {"prompt": "p", "rejected": "r"}, ROWS[0], {"prompt": "p", "chosen": "x", "rejected": "x"}, ROWS[1]]
    res = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows), on_invalid="skip")
    assert len(res.pairs) == 2 and res.rows_read == 5
    assert res.skipped == {"missing 'chosen'": 1, "duplicate pair": 1, "'chosen' equals 'rejected'": 1}


def test_missing_file_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: data file not found"):
        load_pairs(tmp_path / "nope.jsonl")
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{not json\n')
    with pytest.raises(DataError, match=r"b.jsonl:line 2: invalid JSON"):
        load_pairs(bad)


def test_parquet_round_trip_keeps_everything():
    pairs = [
        PreferencePair.create("p", "c", "r", chosen_annotations={"is_safe": True}, metadata={"source": "x"}),
        PreferencePair.create([{"role": "user", "content": "hi"}], "c2", "r2"),
    ]
    assert table_to_pairs(pairs_to_table(pairs)) == pairs


def pku_row(i, safe0, safe1, safer, severity=(0, 2)):
    cats = {"Violence": False, "Cybercrime": True}
    return {
        "prompt": f"prompt {i}",
        "response_0": f"r0 {i}",
        "response_1": f"r1 {i}",
        "prompt_source": "Alpaca3-70B",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca3-8B",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "response_0_harm_category": {k: (not safe0) and v for k, v in cats.items()},
        "response_1_harm_category": {k: (not safe1) and v for k, v in cats.items()},
        "response_0_severity_level": severity[0],
        "response_1_severity_level": severity[1],
        "better_response_id": 1,
        "safer_response_id": safer,
    }


def test_pku_saferlhf_adapter_builds_pairs_like_the_authors(tmp_path):
    rows = [
        pku_row(0, True, False, safer=1),  # exactly one safe: the safe one wins, safer_response_id ignored
        pku_row(1, False, True, safer=0),
        pku_row(2, False, False, safer=1, severity=(3, 1)),  # neither safe: safer_response_id decides
        pku_row(3, True, True, safer=0, severity=(0, 0)),
    ]
    path = tmp_path / "pku.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    res = load_pairs(path, adapter="pku_saferlhf")
    chosen = [p.chosen for p in res.pairs]
    assert chosen == ["r0 0", "r1 1", "r1 2", "r0 3"]
    p = res.pairs[2]
    assert p.chosen_annotations == {"is_safe": False, "harm_categories": {"Violence": False, "Cybercrime": True}, "severity": 1}
    assert p.rejected_annotations["severity"] == 3
    assert p.metadata["chosen_source"] == "Alpaca3-8B" and p.metadata["prompt_source"] == "Alpaca3-70B"
    assert res.pairs[0].rejected_annotations["is_safe"] is False


def test_pku_adapter_rejects_other_schema(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(DataError, match="not a PKU-SafeRLHF row"):
        load_pairs(path, adapter="pku_saferlhf")
