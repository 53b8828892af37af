"""UniSRec-format reader and multi-domain id space on the real data (CKD_DATA_DIR)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ckd.data.multidomain import PAD, build_multidomain
from ckd.data.unisrec import DataFormatError, load_domain, read_index, rebuild_train_from_test


@pytest.fixture(scope="module")
def office(data_dir):
    return load_domain(data_dir, "Office")


@pytest.mark.integration
def test_scientific_exact_counts(data_dir):
    dom = load_domain(data_dir, "Scientific")
    assert (dom.num_users, dom.num_items, dom.num_interactions()) == (8442, 4385, 59427)
    assert (len(dom.train), len(dom.valid), len(dom.test)) == (34101, 8442, 8442)
    assert dom.missing == [] and dom.notes == []
    assert dom.texts is not None and all(dom.texts)
    # leave-one-out nesting: test history == (valid history + valid target)[-50:]
    for vh, vt, th in zip(dom.valid.histories[:500], dom.valid.targets, dom.test.histories):
        assert th.tolist() == (vh.tolist() + [int(vt)])[-50:]


@pytest.mark.integration
def test_rebuild_rule_reproduces_real_scientific_train(data_dir):
    """The rebuild rule used for Office, applied to Scientific, gives back its real train file
    exactly for every user whose test history is not capped at 50."""
    dom = load_domain(data_dir, "Scientific")
    rebuilt = rebuild_train_from_test(dom.test, dom.valid)
    capped = {int(u) for u, h in zip(dom.test.users, dom.test.histories) if len(h) >= 50}
    assert len(capped) == 3  # README anomaly S-1
    key = lambda s: [(int(u), h.tolist(), int(t)) for u, h, t in zip(s.users, s.histories, s.targets)
                     if int(u) not in capped]  # noqa: E731
    real, ours = key(dom.train), key(rebuilt)
    assert len(real) > 33000 and ours == real


@pytest.mark.integration
def test_office_partial_domain(office):
    assert office.num_users == 87346 and office.num_items == 25986
    assert office.missing == ["Office.train.inter", "Office.text"]
    assert office.texts is None
    assert "180 users" in " ".join(office.notes)
    # README: interactions recoverable from test histories = 680,304 (lower bound)
    assert office.num_interactions() == 680304
    assert len(office.train) == sum(len(h) - 2 for h in office.test.histories) == 418266
    # user 0: test history 0 1 2 3 4 -> 5; train items 0..3 give rows (0 1 2)->3, (0 1)->2, (0)->1
    assert office.test.histories[0].tolist() == [0, 1, 2, 3, 4] and int(office.test.targets[0]) == 5
    rows0 = [(h.tolist(), int(t)) for u, h, t in zip(office.train.users, office.train.histories,
                                                      office.train.targets) if u == 0]
    assert rows0 == [([0, 1, 2], 3), ([0, 1], 2), ([0], 1)]
    # rebuilt rows are consistent with the real valid file: each user's last train row plus its
    # target equals the valid history (for users whose valid history is not capped)
    last = {}
    for u, h, t in zip(office.train.users, office.train.histories, office.train.targets):
        last.setdefault(int(u), h.tolist() + [int(t)])  # file order: last target first
    for u, vh in zip(office.valid.users[:2000], office.valid.histories):
        if len(vh) < 50:
            assert last[int(u)] == vh.tolist()


def _write_domain(root: Path, name: str, test_lines: list[str], n_items: int = 3) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}.item2index").write_text("".join(f"I{i}\t{i}\n" for i in range(n_items)))
    (folder / f"{name}.test.inter").write_text("\n".join(test_lines) + "\n")


HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token"


@pytest.mark.unit
@pytest.mark.parametrize("lines,msg", [
    (["user_id\titem_id_list\titem_id", "0\t0 1\t2"], r"Bad\.test\.inter:1: header must be"),
    ([HEADER, "0\t0 1\t2", "x\t0 1\t2"], r"Bad\.test\.inter:3: user id 'x' is not an integer"),
    ([HEADER, "0\t0 1\t2", "1\t0 q\t2"], r"Bad\.test\.inter:3: history item 'q' is not an integer"),
    ([HEADER, "0\t0 1\t2", "1\t0 1\t2", "2\t0 7\t1"], r"Bad\.test\.inter:4: item index 7 outside 0\.\.2"),
    ([HEADER, "0\t0 1"], r"Bad\.test\.inter:2: expected 3 tab-separated columns, got 2"),
])
def test_malformed_files_name_file_and_line(tmp_path, lines, msg):
    _write_domain(tmp_path, "Bad", lines)
    with pytest.raises(DataFormatError, match=msg) as info:
        load_domain(tmp_path, "Bad")
    assert str(tmp_path / "Bad" / "Bad.test.inter") in str(info.value)


@pytest.mark.unit
def test_missing_files_are_clear(tmp_path):
    with pytest.raises(DataFormatError, match="domain folder not found"):
        load_domain(tmp_path, "Nope")
    (tmp_path / "Empty").mkdir()
    with pytest.raises(DataFormatError, match=r"Empty\.item2index: file not found"):
        load_domain(tmp_path, "Empty")
    bad_index = tmp_path / "x.item2index"
    bad_index.write_text("A\t0\nB\tone\n")
    with pytest.raises(DataFormatError, match=r"x\.item2index:2: index 'one' is not an integer"):
        read_index(bad_index)


@pytest.mark.integration
def test_scientific_mm_features(data_dir, scientific_mm):
    dom = load_domain(data_dir, "ScientificMM")
    assert dom.num_items == 1585
    for name in ("feat1CLS", "feat3CLS"):
        mat = dom.features[name]
        assert mat.dtype == np.float32 and mat.shape == (1585, 512)
        assert np.isfinite(mat).all() and np.abs(mat).sum(axis=1).min() > 0
    ds = scientific_mm
    assert ds.features["feat1CLS"].shape == (1586, 512)
    assert not ds.feature_mask["feat1CLS"][PAD] and ds.feature_mask["feat1CLS"][1:].all()
    np.testing.assert_array_equal(ds.features["feat3CLS"][1:], dom.features["feat3CLS"])


@pytest.mark.integration
def test_build_multidomain_ids(data_dir, scientific):
    sci = scientific.domains[0]
    o14 = load_domain(data_dir, "Office14")
    ds = build_multidomain([sci, o14])
    assert ds.vocab_size == 1 + 4385 + 2420 and ds.num_domains == 2
    assert ds.domain_range(0) == (1, 4386) and ds.domain_range(1) == (4386, 4386 + 2420)
    assert ds.item_domain[PAD] == -1 and ds.item_texts[PAD] == "" and not ds.has_text[PAD]
    for d in range(2):
        start, stop = ds.domain_range(d)
        assert (ds.item_domain[start:stop] == d).all()
    assert ds.num_users == 8442 + 4905
    for split in ("train", "valid", "test"):
        ex = ds.splits[split]
        for d in range(2):
            start, stop = ds.domain_range(d)
            rows = ex.domains == d
            assert ((ex.targets[rows] >= start) & (ex.targets[rows] < stop)).all()
            h = ex.histories[rows]
            valid = np.arange(h.shape[1])[None, :] < ex.lengths[rows][:, None]
            assert ((h[valid] >= start) & (h[valid] < stop)).all() and (h[~valid] == PAD).all()
    # global id = offset + local + 1, and the text follows the id
    assert ds.item_texts[4386 + 7] == o14.texts[7]
    # vocab hash: stable across builds, different for another domain set or order
    assert ds.vocab_hash() == build_multidomain([sci, o14]).vocab_hash()
    assert ds.vocab_hash() != scientific.vocab_hash()
    assert ds.vocab_hash() != build_multidomain([o14, sci]).vocab_hash()
    assert len(ds.vocab_hash()) == 64
    # prefix vocabularies: the first entry is Scientific built alone (what its teachers carry)
    assert ds.prefix_vocabularies() == [(scientific.vocab_hash(), scientific.vocab_size),
                                        (ds.vocab_hash(), ds.vocab_size)]
