import bz2
import json

from lmslim.assets import gensim_text, wiki

SAMPLE = """{{Infobox country|name=Testland|capital=Foo}}
'''Testland''' is a [[country]] in [[Europe|western Europe]].<ref>{{cite web|url=x}}</ref> It has
many [[river]]s.

== History ==
Founded in 1900 by [[John Smith (explorer)|John Smith]], see [http://example.org the site].
[[File:Flag.png|thumb|The flag]]
{| class="wikitable"
| 1 || 2
|}
* A list item about trade.

== References ==
{{reflist}}
Smith, J. (2001). Some book.
[[Category:Countries]]
"""


def test_markup_is_stripped():
    text = wiki.wikitext_to_plain(SAMPLE)
    assert "Testland is a country in western Europe." in text
    assert "Founded in 1900 by John Smith, see the site." in text
    assert "A list item about trade." in text
    assert "History" in text.splitlines()
    for junk in ("{{", "[[", "<ref", "Infobox", "wikitable", "thumb", "Category", "Some book", "References"):
        assert junk not in text


def test_split_is_deterministic_and_covers_all():
    titles = [f"Article {i}" for i in range(2000)]
    splits = [wiki.split_of(t) for t in titles]
    assert splits == [wiki.split_of(t) for t in titles]
    share = {s: splits.count(s) / len(splits) for s in wiki.SPLITS}
    assert 0.75 < share["train"] < 0.85 and 0.07 < share["test"] < 0.13


def _page(title, text, ns=0, redirect=False):
    r = '<redirect title="X" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns>{r}<revision><text>{text}</text></revision></page>")


def test_iter_articles_filters(tmp_path):
    body = "Real article text. " * 40
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + _page("Keep", body)
           + _page("Redirect", "#REDIRECT [[Keep]]", redirect=True) + _page("Talk:Keep", body, ns=1)
           + _page("Stub", "Too short.") + "</mediawiki>")
    dump = tmp_path / "d.xml.bz2"
    dump.write_bytes(bz2.compress(xml.encode()))
    assert [a.title for a in wiki.iter_articles(dump)] == ["Keep"]


def test_gensim_text_sets(tmp_path):
    (tmp_path / "p.cor").write_text("__label__pos great .\n__label__neg bad .\n")
    assert gensim_text.write_polarity(tmp_path / "p.cor", tmp_path / "p.jsonl") == 2
    assert json.loads((tmp_path / "p.jsonl").read_text().splitlines()[1]) == {"text": "bad .", "label": "neg"}
    (tmp_path / "docs").write_text("doc a\ndoc b\ndoc c\n")
    (tmp_path / "sims").write_text("1\t0.5\t0.2\n0\t1\t0.9\n0\t0\t1\n")
    assert gensim_text.write_lee_pairs(tmp_path / "docs", tmp_path / "sims", tmp_path / "l.jsonl") == 3
    rows = [json.loads(x) for x in (tmp_path / "l.jsonl").read_text().splitlines()]
    assert rows[2] == {"sentence1": "doc b", "sentence2": "doc c", "score": 0.9}


def test_malformed_markup_residue_is_removed():
    text = wiki.wikitext_to_plain("He sat on the board.<ref>{{cite web |url=http://x.org/a\nNext line here.\n"
                                  "[[File:Tree.svg|thumb|A [[tree]] diagram\nLast line.")
    assert "<ref" not in text and "{{" not in text and "[[" not in text
    assert "He sat on the board." in text and "Last line." in text
