import json

import pytest

from lmslim.core.errors import UserError
from lmslim.data.spec import load_data
from lmslim.data.synthetic import synthetic_ner, synthetic_sentiment


def test_text_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("first doc")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("second doc")
    assert load_data(str(tmp_path / "a.txt")).documents == ["first doc"]
    assert load_data(str(tmp_path)).documents == ["first doc", "second doc"]


def test_jsonl_csv_parquet_columns(tmp_path):
    rows = [{"sentence": "good film", "label": "pos"}, {"sentence": "bad film", "label": "neg"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.csv").write_text("sentence,label\ngood film,pos\nbad film,neg\n")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        d = load_data(str(tmp_path / name), task="seq-cls")
        assert d.texts == ["good film", "bad film"] and d.labels == ["pos", "neg"], name
    assert load_data(str(tmp_path / "d.jsonl"), task="clm").documents == ["good film", "bad film"]


def test_missing_column_names_the_columns(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(UserError, match=r"no text column .* columns are \['body'\]"):
        load_data(str(tmp_path / "d.jsonl"))
    assert load_data(str(tmp_path / "d.jsonl"), text_column="body").documents == ["x"]


def test_fasttext_labels(tmp_path):
    (tmp_path / "p.txt").write_text("__label__pos nice\n__label__neg awful\n")
    d = load_data(str(tmp_path / "p.txt"), task="seq-cls")
    assert d.labels == ["pos", "neg"] and d.texts == ["nice", "awful"]


def test_conll(tmp_path):
    (tmp_path / "n.conll").write_text("-DOCSTART- -X- O\n\nAnna NNP B-PER\nlives VBZ O\nin IN O\n"
                                      "New NNP B-LOC\nYork NNP I-LOC\n\nHi UH O\n")
    d = load_data(str(tmp_path / "n.conll"), task="token-cls")
    assert d.tokens == [["Anna", "lives", "in", "New", "York"], ["Hi"]]
    assert d.tags == [["B-PER", "O", "O", "B-LOC", "I-LOC"], ["O"]]


def test_conll_bad_tag(tmp_path):
    (tmp_path / "n.conll").write_text("Anna PERSON\n")
    with pytest.raises(UserError, match="not a BIO tag"):
        load_data(str(tmp_path / "n.conll"), task="token-cls")


def test_token_tag_length_mismatch(tmp_path):
    (tmp_path / "n.jsonl").write_text(json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(UserError, match="2 tokens but 1 tags"):
        load_data(str(tmp_path / "n.jsonl"), task="token-cls")


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"   \n", "is empty"),
                                           (b"\x7fELF\x00\x00\x01", "binary"), (b"\xff\xfe\xfa", "not UTF-8")])
def test_bad_files(tmp_path, content, match):
    (tmp_path / "x.txt").write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_data(str(tmp_path / "x.txt"))


def test_missing_and_unknown_builtin(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_data(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="unknown builtin data"):
        load_data("builtin:imagenet")


def test_synthetic_sets_are_labelled_and_deterministic():
    a, b = synthetic_ner(20, seed=1), synthetic_ner(20, seed=1)
    assert a == b and all(len(t) == len(g) for t, g in zip(*a))
    assert any(tag.startswith("B-") for tags in a[1] for tag in tags)
    texts, labels = synthetic_sentiment(10, seed=0)
    assert set(labels) == {"pos", "neg"} and len(texts) == 10
