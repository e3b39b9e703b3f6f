"""Long documents are tokenised in pieces: the same packing, memory bounded by the piece."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_hf_names import TEXTS

import datasleuth
import datasleuth.lm.corpus.packing as packing
from datasleuth.demo import build_tokenizer
from datasleuth.lm.corpus import pack_corpus


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(TEXTS, vocab_size=300)


def _arrays(corpus):
    ids = np.stack([corpus.input_ids(i).numpy() for i in range(len(corpus))])
    segs = [tuple(s) for i in range(len(corpus)) for s in corpus.segments(i)]
    return ids, segs


def test_pieces_give_the_packing_of_whole_documents(tokenizer, tmp_path, monkeypatch):
    long = "  ".join(TEXTS * 7) + "\n the   end  "
    docs = ["short one", long, "", "   ", long[:333], "tail document"]
    whole = pack_corpus(docs, tokenizer, seq_len=16, output_dir=tmp_path / "whole",
                        progress=False)
    monkeypatch.setattr(packing, "PIECE_CHARS", 40)
    assert len(packing._pieces([long], 40)) > 10
    cut = pack_corpus(docs, tokenizer, seq_len=16, output_dir=tmp_path / "cut", progress=False)
    for a, b in zip(_arrays(whole), _arrays(cut), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert whole.metadata["num_tokens"] == cut.metadata["num_tokens"]
    for i in range(len(cut)):  # every segment still points at its document's characters
        for seg in cut.segments(i):
            text = docs[seg.doc_index][seg.char_start:seg.char_end]
            assert text == whole.document_text(seg.doc_index)[seg.char_start:seg.char_end]


_PEAK = """
import json, resource, sys
from datasleuth.demo import build_tokenizer
from datasleuth.lm.corpus import pack_corpus
words = json.loads(sys.argv[1])
tok = build_tokenizer(words, vocab_size=300)
doc = " ".join(words * 1)
pack_corpus(["warm up " + doc], tok, seq_len=64, output_dir=sys.argv[2] + "/w", progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
big = " ".join(words * (int(sys.argv[3]) // (len(doc) + 1) + 1))
corpus = pack_corpus([big], tok, seq_len=64, output_dir=sys.argv[2] + "/big", progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"chars": len(big), "tokens": corpus.metadata["num_tokens"],
                  "peak_kib": after - before}))
"""

#: Stated bound: packing one 4-million-character line raises peak memory by less than this
#: (one piece's tokenizer output and the document's text a few times over: reader, hash,
#: documents.arrow); measured 120 MB here, 132 MB for 8 million characters. Tokenising
#: the line whole needed 1.75 GB for 8 million characters.
PEAK_BOUND_MIB = 250


def test_peak_memory_of_one_long_line_is_bounded(tmp_path):
    chars = 4_000_000
    src = str(Path(datasleuth.__file__).resolve().parents[1])  # the code under test
    out = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(TEXTS), str(tmp_path),
                          str(chars)], capture_output=True, text=True, check=True,
                         env={**os.environ, "DATASLEUTH_PROGRESS": "0", "PYTHONPATH": src},
                         cwd=Path(__file__).parent)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["chars"] >= chars and got["tokens"] > chars // 10
    assert got["peak_kib"] / 1024 < PEAK_BOUND_MIB, got
