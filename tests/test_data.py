"""Data pipeline: readers, tokenising (packing / truncation with label masks), order, errors."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jax_unlearn import data as D
from jax_unlearn.data import DataError, HubSource, MultipleChoice, QAPair, TokenizeOptions

IGNORE = -100


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizer_fixtures import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return D.load_tokenizer(tok_dir)


def write_jsonl(path, rows, raw_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(raw_lines), encoding="utf-8")
    return path


def write_json(path, value):
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return path


def enc(tok, text, special=False):
    return tok(text, add_special_tokens=special)["input_ids"]


# ----------------------------------------------------------------------------- readers


def test_read_wmdp_jsonl_corpus(tmp_path):
    path = write_jsonl(tmp_path / "bio.jsonl", [{"text": "Anthrax spores", "title": "x"}, {"text": "Zoë\nline 2"}],
                       raw_lines=["\n", "   \n", json.dumps({"text": "last"}) + "\n"])
    assert D.read_texts(path) == ["Anthrax spores", "Zoë\nline 2", "last"]  # blank lines skipped, order kept
    assert D.read_texts(str(path)) == D.read_texts(path)


def test_read_rwku_json_passages_and_other_field(tmp_path):
    path = write_json(tmp_path / "passages.json", [{"text": "Harry Potter is a wizard.", "target": "HP"},
                                                   {"text": "He attends Hogwarts.", "target": "HP"}])
    assert D.read_texts(path) == ["Harry Potter is a wizard.", "He attends Hogwarts."]
    assert D.read_texts(path, field="target") == ["HP", "HP"]


def test_read_txt_blank_line_documents_or_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first doc\nstill first\n\n\n  \nsecond doc  \n\nthird\n", encoding="utf-8")
    assert D.read_texts(path) == ["first doc\nstill first", "second doc", "third"]
    assert D.read_texts(path, split="line") == ["first doc", "still first", "second doc", "third"]


def test_read_qa_pairs_with_levels(tmp_path):
    path = write_jsonl(tmp_path / "probes.jsonl", [
        {"question": "Who wrote it?", "answer": "Rowling", "level": "forget_1"},
        {"question": "Where?", "answer": "Hogwarts", "level": 2},
        {"question": "What?", "answer": "a wand"},
    ])
    assert D.read_qa(path) == [QAPair("Who wrote it?", "Rowling", "forget_1"), QAPair("Where?", "Hogwarts", "2"),
                               QAPair("What?", "a wand", None)]
    renamed = write_json(tmp_path / "rwku.json", [{"query": "Harry's school is ___.", "answer": "Hogwarts"}])
    assert D.read_qa(renamed, question="query") == [QAPair("Harry's school is ___.", "Hogwarts")]


def test_read_multiple_choice_records(tmp_path):
    rows = [{"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "virology"},
            {"question": "Two?", "choices": ["yes", "no"], "answer": 0}]
    for path in (write_jsonl(tmp_path / "mc.jsonl", rows), write_json(tmp_path / "mc.json", rows)):
        got = D.read_multiple_choice(path)
        assert got == [MultipleChoice("Which?", ("a", "b", "c", "d"), 2, "virology"),
                       MultipleChoice("Two?", ("yes", "no"), 0, None)]
        assert isinstance(got[0].choices, tuple) and got[0].choices[got[0].answer] == "c"
    with pytest.raises(dataclasses.FrozenInstanceError):
        got[0].answer = 1


def test_parquet_through_datasets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one doc", "two doc"], "n": [1, 2]}), tmp_path / "c.parquet")
    assert D.read_texts(tmp_path / "c.parquet") == ["one doc", "two doc"]
    pq.write_table(pa.table({"question": ["Q1", "Q2"], "choices": [["a", "b"], ["c", "d", "e"]], "answer": [1, 2]}),
                   tmp_path / "mc.parquet")
    assert D.read_multiple_choice(tmp_path / "mc.parquet") == [MultipleChoice("Q1", ("a", "b"), 1),
                                                              MultipleChoice("Q2", ("c", "d", "e"), 2)]
    pq.write_table(pa.table({"question": ["Q1"], "choices": [["a", "b"]], "answer": [5]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: row \[0\]: .*'answer' is 5 but there are 2 choices"):
        D.read_multiple_choice(tmp_path / "bad.parquet")


def test_local_files_never_need_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # any `import datasets` now fails
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    write_json(tmp_path / "a.json", [{"question": "q", "answer": "a"}])
    (tmp_path / "a.txt").write_text("doc", encoding="utf-8")
    assert D.read_texts(path) == ["x"] and D.read_texts(tmp_path / "a.txt") == ["doc"]
    assert D.read_qa(tmp_path / "a.json") == [QAPair("q", "a")]
    (tmp_path / "a.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"optional 'datasets' package"):
        D.read_texts(tmp_path / "a.parquet")


def test_hub_source_goes_through_datasets_streaming(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, *, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"text": "hub doc"}, {"text": 3}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = HubSource("cais/wmdp-corpora", "bio-forget-corpus", split="train")
    with pytest.raises(DataError, match=r"hub:cais/wmdp-corpora\[bio-forget-corpus\]/train: row \[1\]: "
                                        r"expected a JSON object with a string field 'text'"):
        D.read_texts(src)
    assert calls == [("cais/wmdp-corpora", "bio-forget-corpus", "train", True)]


# ----------------------------------------------------------------------------- tokenising


TEXTS = ["The capital of France is Paris.", "Anthrax spores survive.", "hello world", "Harry Potter is a wizard."]


def test_pack_joins_with_blank_line_and_chunks_exactly(tok):
    tokens = enc(tok, "\n\n".join(TEXTS))
    assert len(tokens) > 3 * 7 and len(tokens) % 7 != 0
    out = D.pack_texts(TEXTS, tok, 7)
    n = -(-len(tokens) // 7)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: ((n, 7), np.int32) for k in out}
    am = out["attention_mask"].astype(bool)
    np.testing.assert_array_equal(out["input_ids"][am], tokens)  # the chunks concatenate to the joined text
    np.testing.assert_array_equal(out["labels"][am], tokens)  # loss on every token
    assert (out["labels"][~am] == IGNORE).all() and (out["input_ids"][~am] == tok.pad_token_id).all()
    assert am[:-1].all() and am[-1].sum() == len(tokens) % 7  # only the last chunk is padded
    assert tok.bos_token_id not in out["input_ids"]  # packing adds no special tokens (as the reference)
    # the separator really is "\n\n": other separators give other tokens
    assert enc(tok, "\n\n") != enc(tok, " ") and enc(tok, "\n\n")[0] in tokens
    other = D.pack_texts(TEXTS, tok, 5, TokenizeOptions(separator=" "))
    spaced = enc(tok, " ".join(TEXTS))
    assert len(spaced) % 5 > 1 and other["input_ids"][other["attention_mask"].astype(bool)].tolist() == spaced
    dropped = D.pack_texts(TEXTS, tok, 7, TokenizeOptions(drop_remainder=True))
    assert dropped["input_ids"].shape == (n - 1, 7) and dropped["attention_mask"].all()
    np.testing.assert_array_equal(dropped["input_ids"].ravel(), tokens[:(n - 1) * 7])


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.text(alphabet="abc é\n.", max_size=12), min_size=1, max_size=5),
       max_length=st.integers(2, 9))
def test_pack_is_a_lossless_cut_of_the_joined_text(tok, texts, max_length):
    tokens = enc(tok, "\n\n".join(texts))
    if len(tokens) < 2:
        with pytest.raises(DataError, match="the texts set is empty after packing"):
            D.pack_texts(texts, tok, max_length)
        return
    out = D.pack_texts(texts, tok, max_length)
    kept = tokens if len(tokens) % max_length != 1 else tokens[:-1]  # a 1-token remainder predicts nothing
    assert out["input_ids"][out["attention_mask"].astype(bool)].tolist() == kept
    assert out["input_ids"].shape == (-(-len(kept) // max_length), max_length)


def test_truncation_masks_padding_only(tok):
    texts = ["hello world", "The capital of France is Paris. The capital of France is Paris."]
    out = D.tokenize_texts(texts, tok, 12)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: ((2, 12), np.int32) for k in out}
    short = enc(tok, texts[0], special=True)
    assert short[0] == tok.bos_token_id and len(short) < 12
    assert out["input_ids"][0, :len(short)].tolist() == short
    assert out["attention_mask"][0].tolist() == [1] * len(short) + [0] * (12 - len(short))
    assert out["labels"][0].tolist() == short + [IGNORE] * (12 - len(short))
    long = enc(tok, texts[1], special=True)
    assert len(long) > 12 and out["input_ids"][1].tolist() == long[:12] == out["labels"][1].tolist()
    no_bos = D.tokenize_texts(texts, tok, 12, TokenizeOptions(add_special_tokens=False))
    assert no_bos["input_ids"][0, :len(short) - 1].tolist() == short[1:]


def test_truncation_is_counted_or_refused(tok, caplog):
    texts = ["hello world", "The capital of France is Paris. The capital of France is Paris.", "hello"]
    with caplog.at_level("WARNING", logger="jax_unlearn.data"):
        D.tokenize_texts(texts, tok, 12, name="forget")
    long = len(enc(tok, texts[1], special=True))
    assert (f"the forget set: 1 of 3 rows were longer than max_length=12 tokens and lost their end "
            f"(row [1] had {long})") in caplog.text
    with pytest.raises(DataError, match=rf"the forget set: 1 of 3 rows are longer than max_length=12 tokens "
                                        rf"\(row \[1\] has {long}\)"):
        D.tokenize_texts(texts, tok, 12, TokenizeOptions(truncation="error"), name="forget")
    caplog.clear()
    with caplog.at_level("WARNING", logger="jax_unlearn.data"):
        D.tokenize_texts(texts, tok, long, name="forget")  # nothing cut: nothing said
        n = len(enc(tok, "Question: Who?\nAnswer:", special=True)) + 2
        D.tokenize_qa([QAPair("Who?", "Harry Potter attends Hogwarts")], tok, n, name="probes")
    assert "forget" not in caplog.text and f"the probes set: 1 of 1 rows were longer than max_length={n}" in caplog.text
    with pytest.raises(DataError, match="truncation='cut'"):
        TokenizeOptions(truncation="cut")


def test_qa_loss_is_on_the_answer_only(tok):
    pairs = [QAPair("What is the capital of France?", "Paris"), QAPair("Who attends Hogwarts?", "Harry Potter")]
    out = D.tokenize_qa(pairs, tok, 24)
    assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: ((2, 24), np.int32) for k in out}
    for row, pair in enumerate(pairs):
        prompt = f"Question: {pair.question}\nAnswer:"
        expect = enc(tok, prompt + " " + pair.answer, special=True) + [tok.eos_token_id]
        n_prompt = len(enc(tok, prompt, special=True))
        assert enc(tok, prompt + " " + pair.answer, special=True)[:n_prompt] == enc(tok, prompt, special=True)
        assert out["input_ids"][row, :len(expect)].tolist() == expect
        labels = out["labels"][row].tolist()
        assert labels == [IGNORE] * n_prompt + expect[n_prompt:] + [IGNORE] * (24 - len(expect))
        assert tok.decode([t for t in labels if t != IGNORE]) == f" {pair.answer}</s>"
        assert out["attention_mask"][row].sum() == len(expect)
    plain = D.tokenize_qa(pairs, tok, 24, TokenizeOptions(qa_prompt="{question}", qa_answer=" {answer}",
                                                           append_eos=False))
    lab = plain["labels"][0]
    assert tok.decode(lab[lab != IGNORE]) == " Paris" and tok.eos_token_id not in plain["input_ids"]


def test_qa_truncation_cuts_the_answer_and_rejects_rows_without_answer(tok):
    pair = QAPair("Who?", "Harry Potter attends Hogwarts")
    prompt_len = len(enc(tok, "Question: Who?\nAnswer:", special=True))
    out = D.tokenize_qa([pair], tok, prompt_len + 2)
    assert out["attention_mask"].all() and (out["labels"][0, prompt_len:] != IGNORE).sum() == 2
    assert (out["labels"][0, :prompt_len] == IGNORE).all()
    with pytest.raises(DataError, match=r"the probes set: row \[0\] .* no token to take a loss on within "
                                        rf"max_length={prompt_len}"):
        D.tokenize_qa([QAPair("ok?", "yes"), pair], tok, prompt_len, name="probes")


# ----------------------------------------------------------------------------- order


def test_shuffling_is_seeded_and_resumes_from_a_saved_position():
    it = D.ShuffledIndices(10, seed=7)
    run = [next(it) for _ in range(25)]
    for epoch in range(2):
        assert sorted(run[epoch * 10:(epoch + 1) * 10]) == list(range(10))  # every epoch is a permutation
    assert run[:10] != run[10:20]  # epochs reshuffle
    assert D.ShuffledIndices(10, seed=7).take(25).tolist() == run  # seeded
    assert D.ShuffledIndices(10, seed=8).take(25).tolist() != run
    it = D.ShuffledIndices(10, seed=7)
    it.take(13)
    saved = json.loads(json.dumps(it.state()))  # survives a checkpoint's JSON
    assert saved == {"n": 10, "seed": 7, "position": 13} and it.epoch == 1
    resumed = D.ShuffledIndices.from_state(saved)
    assert resumed.take(12).tolist() == run[13:25] == it.take(12).tolist()


def test_paired_batches_resume_and_follow_the_shuffled_order(tmp_path, tok):
    forget = D.tokenize_texts([f"{i} forget doc" for i in range(10)], tok, 8)
    retain = D.tokenize_texts([f"{i} retain doc" for i in range(5)], tok, 8)
    assert len({tuple(r) for r in forget["input_ids"]}) == 10  # rows are distinguishable
    data = D.PairedBatches(forget, retain, batch_size=3, seed=4)
    assert data.steps_per_epoch == 3 and data.position(7) == (2, 1)
    order = D.ShuffledIndices(10, seed=4)
    for t in range(9):
        batch = order.take(3)
        if t % 3 == 2:
            order.take(1)  # the last incomplete batch of each epoch is dropped
        fb, rb = data(t)
        np.testing.assert_array_equal(fb["input_ids"], forget["input_ids"][np.sort(batch)])
        assert {k: v.shape for k, v in rb.items()} == {k: (3, 8) for k in retain}
    resumed = D.PairedBatches(forget, retain, batch_size=3, seed=4)  # a restarted run
    for t in (8, 0, 5, 100):
        for a, b in zip(resumed(t), data(t)):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other = D.PairedBatches(forget, retain, batch_size=3, seed=5)
    assert any(not np.array_equal(other(t)[0]["input_ids"], data(t)[0]["input_ids"]) for t in range(3))


def test_load_unlearning_sets_end_to_end(tmp_path, tok_dir, tok):
    forget = write_jsonl(tmp_path / "bio-forget.jsonl", [{"text": t} for t in TEXTS])
    retain = write_json(tmp_path / "retain.json", [{"text": "hello world"}, {"text": "second document"}])
    f, r = D.load_unlearning_sets(forget, retain, tok_dir, 6)  # tokenizer from its folder; texts are packed
    np.testing.assert_array_equal(f["input_ids"], D.pack_texts(TEXTS, tok, 6)["input_ids"])
    np.testing.assert_array_equal(r["labels"], D.pack_texts(["hello world", "second document"], tok, 6)["labels"])
    f2, r2 = D.load_unlearning_sets(forget, retain, tok, 6, mode="truncate")
    assert f2["input_ids"].shape == (4, 6) and f2["input_ids"][:, 0].tolist() == [tok.bos_token_id] * 4
    qa = write_jsonl(tmp_path / "tofu.jsonl", [{"question": "Capital?", "answer": "Paris"}] * 3)
    f3, _ = D.load_unlearning_sets(qa, retain, tok, 16)
    np.testing.assert_array_equal(f3["labels"], D.tokenize_qa([QAPair("Capital?", "Paris")] * 3, tok, 16)["labels"])
    for arr in (*f.values(), *r.values(), *f3.values()):
        assert arr.dtype == np.int32
    fb, rb = D.PairedBatches(f3, r, batch_size=2, seed=0)(0)
    assert fb["labels"].shape == (2, 16) and rb["input_ids"].shape == (2, 6)
    with pytest.raises(DataError, match="the forget set holds QA pairs, which cannot be packed"):
        D.load_unlearning_sets(qa, retain, tok, 16, mode="pack")


# ----------------------------------------------------------------------------- bad input


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "wmdp.jsonl", [{"text": "ok"}] * 2, raw_lines=["\n", '{"text": "cut\n'])
    with pytest.raises(DataError, match=r"wmdp\.jsonl:4: expected one JSON value per line, got invalid JSON"):
        D.read_texts(path)


def test_missing_or_mistyped_text_field_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "wmdp.jsonl", [{"text": "ok"}] * 16 + [{"txt": "typo"}])
    with pytest.raises(DataError, match=r"wmdp\.jsonl:17: expected a JSON object with a string field 'text' "
                                        r"\(field 'text' is missing\)"):
        D.read_texts(path)
    path = write_jsonl(tmp_path / "w2.jsonl", [{"text": 5}])
    with pytest.raises(DataError, match=r"w2\.jsonl:1: .*\(field 'text' is an integer\)"):
        D.read_texts(path)
    path = write_jsonl(tmp_path / "w3.jsonl", [["not", "an", "object"]])
    with pytest.raises(DataError, match=r"w3\.jsonl:1: .*\(got a list\)"):
        D.read_texts(path)


def test_json_list_errors_name_the_element_line(tmp_path):
    path = write_json(tmp_path / "rwku.json", [{"text": "a"}, {"text": "b"}, {"body": "c"}])
    lines = [i + 1 for i, s in enumerate(path.read_text().splitlines()) if s == "  {"]  # indent=2: one per element
    assert len(lines) == 3
    with pytest.raises(DataError, match=rf"rwku\.json:{lines[2]}: element \[2\]: expected a JSON object with a "
                                        r"string field 'text' \(field 'text' is missing\)"):
        D.read_texts(path)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"text": "a"},\n  {"text": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        D.read_texts(broken)
    write_json(tmp_path / "obj.json", {"text": "a"})
    with pytest.raises(DataError, match=r"obj\.json: expected a JSON list of objects, got an object"):
        D.read_texts(tmp_path / "obj.json")


def test_qa_field_errors(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "q", "answer": 3}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: expected a record with a non-empty string 'question' and a "
                                        r"string 'answer'.*\(field 'answer' is an integer\)"):
        D.read_qa(path)
    write_jsonl(tmp_path / "lv.jsonl", [{"question": "q", "answer": "a", "level": [1]}])
    with pytest.raises(DataError, match=r"lv\.jsonl:1: .*\(field 'level' is a list\)"):
        D.read_qa(tmp_path / "lv.jsonl")


@pytest.mark.parametrize("bad, problem", [
    ({"answer": "B"}, r"field 'answer' is a string"),
    ({"answer": True}, r"field 'answer' is a boolean"),
    ({"answer": 1.0}, r"field 'answer' is a number"),
    ({"answer": 4}, r"'answer' is 4 but there are 4 choices"),
    ({"answer": -1}, r"'answer' is -1 but there are 4 choices"),
    ({"choices": "a b c d"}, r"field 'choices' is a string"),
    ({"choices": ["only"]}, r"'choices' has 1 item"),
    ({"choices": ["a", 2, "c"]}, r"choices\[1\] is an integer"),
    ({"question": None}, r"field 'question' is null"),
    ({"subject": 3}, r"field 'subject' is an integer"),
])
def test_multiple_choice_field_errors(tmp_path, bad, problem):
    good = {"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 1}
    path = write_jsonl(tmp_path / "mmlu.jsonl", [good, good, {**good, **bad}])
    with pytest.raises(DataError, match=r"mmlu\.jsonl:3: expected a record with a string 'question', a list "
                                        rf"'choices' of 2 to 26 strings .*\({problem}\)"):
        D.read_multiple_choice(path)


def test_empty_sets_are_named(tmp_path, tok):
    (tmp_path / "forget.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"the forget\.jsonl set is empty"):
        D.read_texts(tmp_path / "forget.jsonl")
    with pytest.raises(DataError, match=r"the bio set is empty"):
        D.read_texts(tmp_path / "forget.jsonl", name="bio")
    write_json(tmp_path / "mc.json", [])
    with pytest.raises(DataError, match=r"the mc\.json set is empty"):
        D.read_multiple_choice(tmp_path / "mc.json")
    (tmp_path / "r.txt").write_text("  \n\n \n", encoding="utf-8")
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"text": "hello world"}])
    with pytest.raises(DataError, match=r"the retain set is empty"):
        D.load_unlearning_sets(ok, tmp_path / "r.txt", tok, 4)
    with pytest.raises(DataError, match=r"the forget set is empty after packing: 1 tokens"):
        D.load_unlearning_sets(write_jsonl(tmp_path / "tiny.jsonl", [{"text": "a"}]), ok, tok, 4)
    with pytest.raises(DataError, match=r"the probes set is empty"):
        D.tokenize_qa([], tok, 8, name="probes")


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "data.csv").write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"data\.csv: unknown file type '\.csv'; expected one of \.jsonl, \.json"):
        D.read_texts(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such data file"):
        D.read_qa(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"no-tok: no such tokenizer folder"):
        D.load_tokenizer(tmp_path / "no-tok")


def test_other_bad_inputs(tmp_path, tok):
    (tmp_path / "q.txt").write_text("some text", encoding="utf-8")
    with pytest.raises(DataError, match=r"q\.txt: a \.txt file holds plain text; QA pairs need"):
        D.read_qa(tmp_path / "q.txt")
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    with pytest.raises(DataError, match=r"multiple-choice records are for evaluation"):
        D.load_set(mc, tok, 8)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"body": "x"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot tell the format"):
        D.load_set(odd, tok, 8)
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text"):
        D.read_texts(tmp_path / "latin1.jsonl")
    with pytest.raises(DataError, match=r"max_length=1: expected an integer >= 2"):
        D.pack_texts(["hello"], tok, 1)
    with pytest.raises(DataError, match=r"the texts set: row \[1\] .* no token to take a loss on"):
        D.tokenize_texts(["hello world", ""], tok, 8, TokenizeOptions(add_special_tokens=False))
    with pytest.raises(DataError, match=r"qa_answer=' ' must contain \{answer\}"):
        TokenizeOptions(qa_answer=" ")
    with pytest.raises(DataError, match=r"qa_prompt may use only \{question\}"):
        TokenizeOptions(qa_prompt="{q}")
    with pytest.raises(DataError, match=r"mode='chunk'"):
        D.load_set(mc, tok, 8, mode="chunk")
    with pytest.raises(DataError, match=r"cannot shuffle an empty set"):
        D.ShuffledIndices(0, seed=1)
