import torch
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

from lmslim.assets.tiny import byte_tokenizer
from lmslim.data.spec import Data
from lmslim.data.synthetic import synthetic_ner, synthetic_sentiment
from lmslim.measure.eval import classify, token_classify


def _cfg(labels):
    return BertConfig(vocab_size=len(byte_tokenizer("bert")), hidden_size=32, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=64, id2label=dict(enumerate(labels)),
                      label2id={lbl: i for i, lbl in enumerate(labels)})


@torch.no_grad()
def test_classify_accuracy_matches_manual_argmax():
    torch.manual_seed(0)
    tok = byte_tokenizer("bert")
    model = BertForSequenceClassification(_cfg(["neg", "pos"])).eval()
    texts, labels = synthetic_sentiment(12)
    r = classify(model, tok, Data("syn", "seq-cls", texts=texts, labels=labels), batch_size=5)
    manual = [model.config.id2label[int(model(**tok([t], return_tensors="pt")).logits.argmax())] for t in texts]
    assert r["examples"] == 12
    assert r["accuracy"] == sum(p == y for p, y in zip(manual, labels)) / 12


@torch.no_grad()
def test_token_classify_labels_each_word_by_its_first_subtoken():
    torch.manual_seed(0)
    tok = byte_tokenizer("bert")
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    model = BertForTokenClassification(_cfg(tags)).eval()
    words, gold = synthetic_ner(6)
    r = token_classify(model, tok, Data("syn", "token-cls", tokens=words, tags=gold), batch_size=4)
    # Recompute the first-sub-token predictions by hand, one sentence at a time.
    manual = []
    for sent in words:
        enc = tok(sent, is_split_into_words=True, return_tensors="pt")
        best = model(**enc).logits[0].argmax(-1)
        first = {}
        for pos, w in enumerate(enc.word_ids(0)):
            if w is not None and w not in first:
                first[w] = tags[int(best[pos])]
        manual.append([first[i] for i in range(len(sent))])
    from lmslim.measure.eval import entity_report

    assert r["micro"] == entity_report(gold, manual)["micro"]
    assert r["sentences"] == 6 and r["words_truncated"] == 0
