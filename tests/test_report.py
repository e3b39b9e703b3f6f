"""Tests for the self-contained HTML report (datasleuth.report)."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from datasleuth.errors import DatasleuthError
from datasleuth.report import load_results, render_report, validate_results
from datasleuth.report.render import _SCRIPT

SCRIPT_TAG = "<script>alert(1)</script>"
IMG_TAG = '"><img src=x onerror=alert(1)>'
URL = "https://evil.example/x.js"
EVIL = f"{SCRIPT_TAG} {IMG_TAG} & {URL}"


def _sequence(rank: int, sign: float, tokens: list[str], scores: list[float]) -> dict[str, Any]:
    return {
        "rank": rank,
        "index": 100 + rank,
        "score": sign * 2.5 / rank,
        "layer_scores": [0.5 * sign, -0.25 * sign, 1.0 * sign],
        "documents": [{"doc_index": 3, "char_start": 0, "char_end": 40}],
        "tokens": tokens,
        "token_scores": scores,
        "spurious": rank == 1,
        "token_offset_note": f"heat on t pairs input t with predicting t+1 {EVIL}",
    }


def _results() -> dict[str, Any]:
    tokens = ["Hello", " world", "\n", EVIL, "&", SCRIPT_TAG, IMG_TAG]
    pos_scores = [0.9, -0.3, 0.0, 0.1, 0.2, -0.05, 0.4]
    neg_scores = [-0.9, 0.3, 0.0, -0.1, -0.2, 0.05, -0.4]
    return {
        "format_version": 1,
        "tool": "datasleuth",
        "model": f"model {EVIL}",
        "corpus": f"corpus {EVIL}",
        "config": {"damping": 0.001, EVIL: EVIL},
        "created": "2024-05-01T12:00:00Z",
        "warnings": [f"candidates were pre-selected by BM25 {EVIL}"],
        "queries": [
            {
                "id": f"q-{EVIL}",
                "prompt": f"Prompt {EVIL}\n",
                "completion": f" completion {EVIL}",
                "completion_tokens": [" completion", SCRIPT_TAG, IMG_TAG],
                "score_histogram": {"edges": [-3.0, -1.0, 0.0, 1.0, 3.0], "counts": [4, 0, 10, 2]},
                "n_scanned": 16,
                "layer_names": ["layer.0", f"layer {EVIL}", "layer.2"],
                "top": [
                    _sequence(1, 1.0, tokens, pos_scores),
                    _sequence(2, 1.0, tokens, pos_scores),
                ],
                "bottom": [_sequence(1, -1.0, tokens, neg_scores)],
            },
            {
                "id": "second",
                "prompt": "p",
                "completion": "c",
                "completion_tokens": ["c"],
                "score_histogram": {"edges": [0.0, 1.0], "counts": [1]},
                "n_scanned": 1,
                "layer_names": [],
                "top": [],
                "bottom": [],
            },
        ],
    }


class _Collector(HTMLParser):
    """Collects start tags, their attributes, script bodies and text nodes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))
        self._in_script = tag == "script"

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        (self.scripts if self._in_script else self.text).append(data)


@pytest.fixture()
def rendered(tmp_path: Path) -> tuple[str, _Collector]:
    out = render_report(_results(), tmp_path / "report.html")
    html = out.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(html)
    parser.close()
    return html, parser


def test_user_text_is_escaped(rendered: tuple[str, _Collector]) -> None:
    html, parser = rendered
    # Exactly one <script> element: ours, with our constant body.
    assert html.lower().count("<script") == 1
    assert [t for t, _ in parser.tags].count("script") == 1
    assert parser.scripts == [_SCRIPT]
    assert "<img" not in html.lower()
    assert "img" not in {t for t, _ in parser.tags}
    for _, attrs in parser.tags:
        for name, _value in attrs:
            assert not name.startswith("on"), name
    # The escaped forms are there, and the parsed text round-trips to the original.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    text = "".join(parser.text)
    assert EVIL in text
    assert "& " in text and "&amp;" in html


def test_no_external_resources(rendered: tuple[str, _Collector]) -> None:
    html, parser = rendered
    for _, attrs in parser.tags:
        for name, value in attrs:
            assert "://" not in (value or ""), (name, value)
            if name in {"src", "href", "xlink:href", "action", "srcset"}:
                assert (value or "").startswith("#"), (name, value)
    assert "url(" not in html and "@import" not in html
    # Every "://" in the file belongs to escaped user text.
    text = "".join(parser.text)
    assert html.count("://") == text.count("://") == text.count(URL)
    assert "default-src 'none'" in html


def test_heat_map_sign_classes(rendered: tuple[str, _Collector]) -> None:
    html, _ = rendered
    cells = re.findall(r'<span class="tok ([^"]*)" style="--a:([0-9.]+)" title="([^"]*)">', html)
    by_title = {title: cls.split() for cls, _, title in cells}
    assert by_title["token 0: score 0.9 (100% of max |score|)"][:1] == ["pos"]
    assert "peak" in by_title["token 0: score 0.9 (100% of max |score|)"]
    assert by_title["token 0: score -0.9 (100% of max |score|)"][:1] == ["neg"]
    assert by_title["token 1: score -0.3 (33% of max |score|)"][:1] == ["neg"]
    assert by_title["token 1: score 0.3 (33% of max |score|)"][:1] == ["pos"]
    assert by_title["token 2: score 0.0 (0% of max |score|)"][:1] == ["zero"]
    alphas = {title: float(a) for _, a, title in cells}
    assert (
        alphas["token 0: score 0.9 (100% of max |score|)"]
        > alphas["token 1: score -0.3 (33% of max |score|)"]
        > alphas["token 2: score 0.0 (0% of max |score|)"]
        == 0.0
    )
    # Newlines inside tokens are drawn as a visible symbol followed by a line break.
    assert '<span class="ws">⏎</span><br>' in html


def test_histogram_has_one_bar_per_count(rendered: tuple[str, _Collector]) -> None:
    html, _ = rendered
    svgs = re.findall(r'<svg class="hist".*?</svg>', html, flags=re.S)
    assert len(svgs) == 2
    assert svgs[0].count('<rect class="bar"') == 4
    assert svgs[1].count('<rect class="bar"') == 1
    # Three shown sequences (2 top + 1 bottom) are marked on the first histogram.
    assert svgs[0].count('<line class="mark pos"') == 2
    assert svgs[0].count('<line class="mark neg"') == 1


def test_badges_layers_notes_and_toc(rendered: tuple[str, _Collector]) -> None:
    html, parser = rendered
    assert html.count('<span class="badge spurious" title=') == 2  # rank 1 of top and bottom
    assert html.count('aria-label="Per-layer influence"') == 3
    assert html.count('<rect class="pos"') == 2 * 2 + 1  # 2 positive layers per top seq
    assert 'href="#q0"' in html and 'href="#q1"' in html
    assert 'role="alert"' in html
    text = "".join(parser.text)
    assert "Token offset:" in text and "predicting t+1" in text
    assert '<mark class="completion"' in html


def test_atomic_write_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "report.html"
    assert render_report(_results(), target) == target
    render_report(_results(), target)  # overwrite in place
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.html"]


def test_failed_render_leaves_nothing(tmp_path: Path) -> None:
    bad = _results()
    del bad["queries"][0]["top"][0]["tokens"]
    with pytest.raises(DatasleuthError):
        render_report(bad, tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def _mutations() -> list[tuple[str, Any]]:
    def q(doc: dict[str, Any]) -> dict[str, Any]:
        return doc["queries"][0]

    return [
        ("format_version", lambda d: d.update(format_version="1")),
        ("tool", lambda d: d.update(tool="other")),
        ("created", lambda d: d.update(created="yesterday")),
        ("warnings", lambda d: d.update(warnings="oops")),
        ("queries", lambda d: d.pop("queries")),
        ("counts", lambda d: q(d)["score_histogram"].update(counts=[1, 2])),
        ("edges", lambda d: q(d)["score_histogram"].update(edges=[0.0, -1.0, 2.0, 3.0, 4.0])),
        ("counts[0]", lambda d: q(d)["score_histogram"].update(counts=[-1, 0, 0, 0])),
        ("token_scores", lambda d: q(d)["top"][0]["token_scores"].pop()),
        ("layer_scores", lambda d: q(d)["top"][0]["layer_scores"].pop()),
        ("score", lambda d: q(d)["top"][0].update(score=float("nan"))),
        ("spurious", lambda d: q(d)["top"][0].update(spurious=1)),
        ("rank", lambda d: q(d)["bottom"][0].update(rank=True)),
        ("char_start", lambda d: q(d)["top"][0]["documents"][0].update(char_start=99)),
        ("tokens[1]", lambda d: q(d)["top"][0]["tokens"].__setitem__(1, 7)),
    ]


@pytest.mark.parametrize(("needle", "mutate"), _mutations())
def test_malformed_results_raise(needle: str, mutate: Any) -> None:
    doc = copy.deepcopy(_results())
    mutate(doc)
    with pytest.raises(DatasleuthError) as info:
        validate_results(doc)
    message = str(info.value)
    assert "\n" not in message
    assert needle in message


def test_newer_format_version_asks_for_upgrade() -> None:
    doc = _results()
    doc["format_version"] = 2
    with pytest.raises(DatasleuthError, match="upgrade datasleuth"):
        validate_results(doc)


def test_load_results_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results()), encoding="utf-8")
    assert load_results(path) == _results()
    with pytest.raises(DatasleuthError, match="not found"):
        load_results(tmp_path / "missing.json")
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(DatasleuthError, match="not valid JSON"):
        load_results(path)
    path.write_text("[]", encoding="utf-8")
    with pytest.raises(DatasleuthError, match="must be an object"):
        load_results(path)


def test_directory_target_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(DatasleuthError, match="is a directory"):
        render_report(_results(), tmp_path)


def test_whitespace_and_control_characters_are_visible(tmp_path: Path) -> None:
    doc = _results()
    seq = doc["queries"][0]["top"][0]
    seq["tokens"] = ["a\tb", "", "x\x00", " plain"]
    seq["token_scores"] = [1.0, -1.0, 0.5, 0.25]
    html = render_report(doc, tmp_path / "r.html").read_text(encoding="utf-8")
    assert 'title="token 0: score 1.0 (100% of max |score|)">a<span class="ws">⇥</span>b<' in html
    assert '<span class="ws">∅</span>' in html
    assert 'x<span class="ws">␀</span>' in html
    assert "\x00" not in html
    assert '(25% of max |score|)"> plain</span>' in html


def test_sparsity_summary_is_shown_when_present(tmp_path: Path) -> None:
    doc = _results()
    plain = render_report(doc, tmp_path / "plain.html").read_text()
    assert "Top 1% of sequences hold" not in plain
    doc["queries"][0]["sparsity"] = {"n_sample": 10, "top_share": {"0.01": 0.375},
                                     "power_law": {"alpha": 2.25}}
    html = render_report(doc, tmp_path / "sparse.html").read_text()
    assert "38% of the positive influence" in html and "2.25" in html


def test_layer_bars_are_labelled_with_names_and_an_axis(rendered: tuple[str, _Collector]) -> None:
    from datasleuth.report.render import _layer_chart

    html, _ = rendered
    chart = _layer_chart([0.5, -0.25, 1.0], ["transformer.h.0.mlp.c_fc",
                                             "transformer.h.0.mlp.c_proj",
                                             "transformer.h.1.mlp.c_fc"])
    assert [r["label"] for r in chart["rows"]] == ["0.mlp.c_fc", "0.mlp.c_proj", "1.mlp.c_fc"]
    assert [t[2] for t in chart["ticks"]] == ["-1.000e+00", "0", "+1.000e+00"]
    # Bar lengths are proportional to |value| and start at the zero line.
    widths = [float(r["w"]) for r in chart["rows"]]
    assert widths[0] == pytest.approx(widths[2] / 2, abs=0.01)
    assert widths[1] == pytest.approx(widths[2] / 4, abs=0.01)
    assert float(chart["rows"][1]["x"]) + widths[1] == pytest.approx(float(chart["mid"]))
    # In the page: one name label per layer and tick labels in the score format.
    assert html.count('class="lname">layer.0<title>') == 3
    assert "+1.000e+00</text>" in html


def test_one_score_format_and_what_a_score_means(rendered: tuple[str, _Collector]) -> None:
    html, _ = rendered
    assert ">+2.500e+00</span>" in html and ">-2.500e+00</span>" in html
    assert ">+1.250e+00</span>" in html
    assert "Score / N" in html and "first-order change in log p(completion | prompt)" in html


def test_marks_comparison_and_document_names(tmp_path: Path) -> None:
    doc = _results()
    doc["queries"][0]["top"][0]["documents"][0]["title"] = "Harbor help <b>center</b>"
    doc["queries"][0]["bottom"][0]["documents"][0]["doc_index"] = 7
    comparison = {"planted": 2, "k": 2, "methods": [
        {"method": "influence (EK-FAC)", "top": [1, 2], "bottom": []},
        {"method": "BM25 keyword search", "top": [], "bottom": [1]},
    ]}
    html = render_report(doc, tmp_path / "r.html", marks={3: "PLANTED", 7: "decoy"},
                         comparison=comparison).read_text(encoding="utf-8")
    # The table's legend, then top #1 and #2 (doc 3).
    assert html.count('<span class="badge planted">PLANTED</span>') == 3
    assert html.count('<span class="badge decoy">decoy</span>') == 1  # bottom #1 (doc 7)
    assert 'title="title">Harbor help &lt;b&gt;center&lt;/b&gt;</span>' in html
    assert "<td><b>influence (EK-FAC)</b></td><td class=\"mono\">2 of 2</td>" in html
    assert "<td>BM25 keyword search</td><td class=\"mono\">0 of 2</td>" in html
    assert '<td class="mono">1 (#1)</td>' in html
    plain = render_report(_results(), tmp_path / "p.html").read_text(encoding="utf-8")
    body = plain.split("</style>")[1]
    assert "badge planted" not in body and "comparison" not in body
