"""Raw Amazon 2018 reader (ckd.data.raw_amazon) on a hand-made fixture in both input formats.

Fixture (file order = line number; X has a meta record without title, Z has none):

    users u3 u1 u2 u4 u5 survive; u6 (A B F C + X) and u7 (A + Z) drop in k-core round 1,
    then item F (left with u1..u4 = 4 interactions) drops in round 2; round 3 is stable.

Expected result, hand-derived from the rules in the module docstring:
    user2index  u3 0, u1 1, u2 2, u4 3, u5 4   (first kept interaction: lines 1, 2, 6, 19, 24)
    item2index  C 0, A 1, B 2, D 3, E 4        (first appearance walking u3's sequence C A B D E)
    sequences   u3: C A B D E = 0 1 2 3 4      u1: B C D E A = 2 0 3 4 1
                u2: B D E A C = 2 3 4 1 0      (D and E share t=30: file order D, E)
                u4: A B C D E = 1 2 0 3 4      u5: A B C D E A = 1 2 0 3 4 1 (repeat kept)
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ckd.data.raw_amazon import (clean_text, item_text, prepare_domain, read_reviews, split_rows)
from ckd.data.unisrec import DataFormatError, load_domain

REPO_ROOT = Path(__file__).resolve().parents[1]

# (user, item, rating, timestamp) in file order; line 8 duplicates line 2 exactly.
REVIEWS = [
    ("u3", "C", 5, 10), ("u1", "A", 4, 20), ("u1", "B", 4, 5), ("u7", "A", 3, 1),
    ("u6", "X", 5, 1), ("u2", "D", 5, 30), ("u2", "E", 5, 30), ("u1", "A", 4, 20),
    ("u3", "A", 5, 11), ("u3", "B", 5, 12), ("u3", "D", 5, 13), ("u3", "E", 5, 14),
    ("u1", "C", 4, 6), ("u1", "D", 4, 7), ("u1", "E", 4, 8), ("u2", "A", 5, 31),
    ("u2", "B", 5, 29), ("u2", "C", 5, 32), ("u4", "E", 2, 50), ("u4", "D", 2, 49),
    ("u4", "C", 2, 48), ("u4", "B", 2, 47), ("u4", "A", 2, 46), ("u5", "A", 1, 60),
    ("u5", "B", 1, 61), ("u5", "C", 1, 62), ("u5", "D", 1, 63), ("u5", "E", 1, 64),
    ("u5", "A", 3, 65), ("u6", "A", 5, 2), ("u6", "B", 5, 3), ("u6", "F", 5, 4),
    ("u6", "C", 5, 5), ("u7", "Z", 1, 2), ("u1", "F", 3, 9), ("u2", "F", 3, 33),
    ("u3", "F", 3, 15), ("u4", "F", 3, 51),
]

META = [
    {"asin": "W", "title": "Unused item", "category": ["Other"]},
    {"asin": "E", "title": "Epoxy\r\n", "category": ["Adhesives"], "brand": "Gorilla"},
    {"asin": "A", "title": 'Widget &amp; "Gadget"\nPro...', "category": ["Industrial & Scientific", "Tapes"],
     "brand": "Acme", "price": "$3.00"},
    {"asin": "X", "category": ["No title here"], "brand": "Nobody"},
    {"asin": "C", "title": "Cable", "category": [], "brand": "x" * 1999},
    {"asin": "A", "title": "Second record of A is ignored"},
    {"asin": "B", "title": "Bolt", "brand": ""},
    {"asin": "F", "title": "Fan"},
    {"asin": "D", "title": "Drill bits", "category": ["Tools", "Power &amp; Hand"], "brand": "y" * 1998},
]

TEXTS = {  # .text rows in meta-file order (W unused, X without title, F removed by the k-core)
    "E": "Epoxy. Adhesives. Gorilla. ",
    "A": "Widget & GadgetPro. Industrial & Scientific Tapes. Acme. ",
    "C": "Cable. ",  # empty category list adds nothing; the 2,000-char brand becomes empty
    "B": "Bolt. ",
    "D": "Drill bits. Tools Power & Hand. " + "y" * 1998 + ". ",  # 1,999 chars: kept
}

SEQUENCES = [[0, 1, 2, 3, 4], [2, 0, 3, 4, 1], [2, 3, 4, 1, 0], [1, 2, 0, 3, 4], [1, 2, 0, 3, 4, 1]]
USERS = ["u3", "u1", "u2", "u4", "u5"]
ITEMS = ["C", "A", "B", "D", "E"]


def _write_json_gz(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path


def _reviews_json(path: Path) -> Path:
    return _write_json_gz(path, [{"reviewerID": u, "asin": i, "overall": float(r), "unixReviewTime": t,
                                  "reviewText": "ok", "verified": True} for u, i, r, t in REVIEWS])


def _reviews_csv(path: Path, header: bool = False) -> Path:
    lines = ["item,user,rating,timestamp"] if header else []
    lines += [f"{i},{u},{float(r)},{t}" for u, i, r, t in REVIEWS]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def raw_files(tmp_path: Path) -> dict[str, Path]:
    return {
        "json": _reviews_json(tmp_path / "Industrial_and_Scientific.json.gz"),
        "csv": _reviews_csv(tmp_path / "Industrial_and_Scientific.csv"),
        "csv_header": _reviews_csv(tmp_path / "with_header.csv", header=True),
        "meta": _write_json_gz(tmp_path / "meta_Industrial_and_Scientific.json.gz", META),
    }


def _read(folder: Path, suffix: str) -> str:
    return (folder / f"Toy.{suffix}").read_text()


@pytest.mark.unit
def test_clean_text_rules():
    assert clean_text("a &quot;b&quot;\nc") == "a bc."
    assert clean_text(["x", "y &amp; z"]) == "x y & z."
    assert clean_text("ends..") == "ends."
    assert clean_text("tab\there") == "tab here."
    assert clean_text("") == "" and clean_text([]) == "" and clean_text('""') == ""
    assert clean_text("a" * 1998) == "a" * 1998 + "."  # 1,999 chars
    assert clean_text("a" * 1999) == ""  # 2,000 chars with its '.'
    assert item_text({"title": "T", "category": ["c1", "c2"], "brand": "B"}) == "T. c1 c2. B. "
    assert item_text({"brand": "B", "title": "T"}) == "T. B. "  # fixed field order, absent skipped


@pytest.mark.unit
def test_split_rows_caps_history():
    rows, valid, test = split_rows(np.arange(8), max_history=3)
    got = [(h.tolist(), y) for h, y in rows]
    assert got == [([2, 3, 4], 5), ([1, 2, 3], 4), ([0, 1, 2], 3), ([0, 1], 2), ([0], 1)]
    assert (valid[0].tolist(), valid[1]) == ([3, 4, 5], 6)
    assert (test[0].tolist(), test[1]) == ([4, 5, 6], 7)


@pytest.mark.unit
def test_reader_counts_and_duplicates(raw_files):
    raw = read_reviews(raw_files["json"])
    assert raw.lines == len(REVIEWS) and raw.duplicates == 1
    assert len(raw.users) == len(REVIEWS) - 1


@pytest.mark.unit
@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_five_core_split_and_text(raw_files, tmp_path, fmt):
    stats = prepare_domain(raw_files[fmt], raw_files["meta"], tmp_path / "out", "Toy")
    folder = tmp_path / "out" / "Toy"
    assert stats["k_core_rounds"] == 2
    assert (stats["users"], stats["items"], stats["interactions"]) == (5, 5, 26)
    assert stats["duplicates_dropped"] == 1 and stats["items_without_metadata"] == 2  # X, Z
    assert _read(folder, "user2index") == "".join(f"{u}\t{i}\n" for i, u in enumerate(USERS))
    assert _read(folder, "item2index") == "".join(f"{a}\t{i}\n" for i, a in enumerate(ITEMS))
    assert _read(folder, "text") == "item_id:token\ttext:token_seq\n" + "".join(
        f"{a}\t{t}\n" for a, t in TEXTS.items())
    header = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
    assert _read(folder, "test.inter") == header + (
        "0\t0 1 2 3\t4\n1\t2 0 3 4\t1\n2\t2 3 4 1\t0\n3\t1 2 0 3\t4\n4\t1 2 0 3 4\t1\n")
    assert _read(folder, "valid.inter") == header + (
        "0\t0 1 2\t3\n1\t2 0 3\t4\n2\t2 3 4\t1\n3\t1 2 0\t3\n4\t1 2 0 3\t4\n")
    assert _read(folder, "train.inter") == header + (
        "0\t0 1\t2\n0\t0\t1\n1\t2 0\t3\n1\t2\t0\n2\t2 3\t4\n2\t2\t3\n"
        "3\t1 2\t0\n3\t1\t2\n4\t1 2 0\t3\n4\t1 2\t0\n4\t1\t2\n")
    on_disk = json.loads((folder / "stats.json").read_text())
    assert on_disk["train_rows"] == 11 and on_disk["sources"]["meta"]["sha256"]


@pytest.mark.unit
def test_both_formats_and_reruns_give_identical_files(raw_files, tmp_path):
    outs = []
    for fmt, run in (("json", "a"), ("json", "b"), ("csv", "c"), ("csv_header", "d")):
        prepare_domain(raw_files[fmt], raw_files["meta"], tmp_path / run, "Toy")
        outs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run / "Toy").iterdir())
                     if p.name != "stats.json"})
    assert len(outs[0]) == 6
    assert outs[0] == outs[1] == outs[2] == outs[3]
    # stats.json too is byte-identical for the same inputs
    assert (tmp_path / "a/Toy/stats.json").read_bytes() == (tmp_path / "b/Toy/stats.json").read_bytes()


@pytest.mark.unit
def test_load_domain_reads_the_output(raw_files, tmp_path):
    prepare_domain(raw_files["json"], raw_files["meta"], tmp_path, "Toy")
    dom = load_domain(tmp_path, "Toy")
    assert dom.missing == [] and dom.notes == []
    assert (dom.num_users, dom.num_items, dom.num_interactions()) == (5, 5, 26)
    assert (len(dom.train), len(dom.valid), len(dom.test)) == (11, 5, 5)
    assert dom.item_tokens == ITEMS
    assert dom.texts == [TEXTS[a].strip() for a in ITEMS]
    # full sequences rebuilt from the loaded test split match the hand-derived ones
    assert [h.tolist() + [int(t)] for h, t in zip(dom.test.histories, dom.test.targets)] == SEQUENCES


def _bad_json_gz(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "bad.json.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


@pytest.mark.unit
def test_malformed_inputs_name_file_and_line(raw_files, tmp_path):
    ok = json.dumps({"reviewerID": "u", "asin": "A", "overall": 5.0, "unixReviewTime": 1})
    cases = [
        ([ok, ok, "{not json"], "bad.json.gz:3: not valid JSON"),
        ([ok, json.dumps({"reviewerID": "u", "asin": "A", "overall": 5})],
         "bad.json.gz:2: review lacks unixReviewTime"),
        ([ok, ok, ok, ok.replace(": 1}", ': "soon"}')], "bad.json.gz:4: timestamp 'soon' is not an integer"),
    ]
    for lines, msg in cases:
        path = _bad_json_gz(tmp_path, lines)
        with pytest.raises(DataFormatError, match=msg.replace(".", r"\.")):
            prepare_domain(path, raw_files["meta"], tmp_path / "o", "Toy")
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("A,u,5.0,1\nA,u,5.0\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:2: expected 4 comma-separated columns"):
        read_reviews(csv_path)
    csv_path.write_text("A,u,five,1\n")
    with pytest.raises(DataFormatError, match=r"bad\.csv:1: rating 'five' is not a number"):
        read_reviews(csv_path)
    meta = _write_json_gz(tmp_path / "meta_bad.json.gz", [{"asin": "A", "title": "t"}, {"title": "no asin"}])
    with pytest.raises(DataFormatError, match=r"meta_bad\.json\.gz:2: meta record has no asin"):
        prepare_domain(raw_files["json"], meta, tmp_path / "o", "Toy")
    with pytest.raises(DataFormatError, match="nope.json.gz: file not found"):
        read_reviews(tmp_path / "nope.json.gz")
    assert not (tmp_path / "o" / "Toy").exists()  # nothing half-written


@pytest.mark.unit
def test_cli_writes_domain_and_reports_errors_cleanly(raw_files, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "launch.prepare_data", "--reviews", str(raw_files["csv"]),
           "--meta", str(raw_files["meta"]), "--out", str(tmp_path), "--name", "Toy",
           "--max-history", "3"]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["interactions"] == 26
    # the cap of 3 shows in u5's valid row: train items 1 2 0 3 -> last three
    assert _read(tmp_path / "Toy", "valid.inter").splitlines()[-1] == "4\t2 0 3\t4"
    bad = tmp_path / "bad.csv"
    bad.write_text("A,u,5.0,1\nA,u\n")
    cmd[cmd.index("--reviews") + 1] = str(bad)
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "bad.csv:2:" in res.stderr and "Traceback" not in res.stderr
