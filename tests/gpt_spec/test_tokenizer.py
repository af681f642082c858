import shutil
import socket

import pytest

from gpt_spec import get_tokenizer
from gpt_spec.tokenizer import _bundled_file, build_gpt2_encoding


def test_books_sentences_encode_to_the_books_ids():
    tok = get_tokenizer()
    assert tok.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tok.encode("Every day holds a") == [6109, 1110, 6622, 257]
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    text = "Hello, I am a GPT twin. <|endoftext|> ünïcödé 🙂"
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_builds_with_the_network_closed(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network is closed in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    tok = build_gpt2_encoding(_bundled_file("vocab.bpe"), _bundled_file("encoder.json"))
    assert tok.encode(" moves you") == [6100, 345]


def test_a_tampered_vocabulary_file_is_refused(tmp_path):
    vocab = tmp_path / "vocab.bpe"
    shutil.copy(_bundled_file("vocab.bpe"), vocab)
    with open(vocab, "a", encoding="utf-8") as f:
        f.write("x y\n")
    with pytest.raises(ValueError, match=r"vocab.bpe has sha256 [0-9a-f]{64}, expected 1ce16647"):
        build_gpt2_encoding(vocab, _bundled_file("encoder.json"))
    with pytest.raises(ValueError, match="cannot read GPT-2 vocabulary file"):
        build_gpt2_encoding(tmp_path / "absent.bpe", _bundled_file("encoder.json"))
