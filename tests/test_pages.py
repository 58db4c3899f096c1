"""The pages people read: every page — a run's, a comparison's, the published series', the energy
page — is one Markdown file and one self-contained HTML file with the same content, opens with a
headline, defines its terms, and captions every figure, whose image resolves. In a real browser
(Debian's headless Chromium, where installed) no table spills out of the page and every figure
loads, the committed reference pages included."""

from __future__ import annotations

import base64
import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import browser
import numpy as np
import pytest

from conftest import FAST, run_cli
from geobench import energy_report
from geobench.shared_direction import Measurement

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_PAGES = sorted((ROOT / "reports" / "reference").glob("*/*.html"))
PNG = b"\x89PNG\r\n\x1a\n"


class Blocks(HTMLParser):
    """The HTML page as text blocks: headings, paragraphs, list items, table rows, definitions,
    captions, and the images' sources."""

    BLOCK = {"h1", "h2", "h3", "h4", "p", "li", "tr", "dt", "dd", "figcaption", "caption"}

    def __init__(self):
        super().__init__()
        self.headings: list[str] = []
        self.texts: list[str] = []
        self.images: list[str] = []
        self._open: list[str] = []
        self._text = ""

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag in self.BLOCK:
            self._open.append(tag)
            self._text = ""
        elif tag in ("td", "th") and self._open[-1:] == ["tr"]:
            self._text += "\x00"  # a cell starts

    def handle_endtag(self, tag):
        if self._open and tag == self._open[-1]:
            self._open.pop()
            text = " | ".join(" ".join(cell.split()) for cell in self._text.split("\x00")[1:]) if tag == "tr" \
                else " ".join(self._text.split())
            (self.headings if tag.startswith("h") else self.texts).append(text)
            self._text = ""

    def handle_data(self, data):
        self._text += data


def plain(markdown: str) -> str:
    """Inline Markdown as the text it renders to."""
    text = re.sub(r"`([^`]+)`", r"\1", markdown)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    return " ".join(text.replace("\\|", "|").split())


def markdown_blocks(text: str) -> tuple[list[str], list[str], list[str], list[str]]:
    """(headings, paragraphs and table rows and list items, image paths, the headline) of a Markdown page."""
    headings, texts, images, headline = [], [], [], []
    for line in text.splitlines():
        if not line.strip() or re.fullmatch(r"\|(---\|)+", line):
            continue
        if line.startswith("#"):
            headings.append(plain(line.lstrip("#").strip()))
        elif line.startswith("> "):
            headline.append(plain(line[2:]))
        elif found := re.fullmatch(r"!\[(.*)\]\((.+)\)", line):
            images.append(found.group(2))
        elif line.startswith("| "):
            cells = [plain(c.strip()) for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if any(cells):  # a key/value table's empty header is not drawn in HTML
                texts.append(" | ".join(cells))
        elif line.startswith("- **"):
            continue  # a term: a <dt> and a <dd> in HTML, checked apart
        elif line.startswith("- "):
            texts.append(plain(line[2:]))
        else:
            texts.append(plain(line))
    return headings, texts, images, headline


def assert_same_page(directory: Path, stem: str) -> Blocks:
    """The HTML holds every heading, paragraph, list item, table row, term and caption of the
    Markdown, in order, and the same figures; every image resolves."""
    md = (directory / f"{stem}.md").read_text()
    page = Blocks()
    page.feed((directory / f"{stem}.html").read_text())
    headings, texts, images, headline = markdown_blocks(md)
    assert page.headings == headings
    assert headline and page.texts[0] == headline[0], "both open with the headline"
    flattened = [" ".join(t.split()) for t in page.texts]
    position = 0
    for text in texts:
        wanted = plain(text)
        found = next((i for i in range(position, len(flattened)) if wanted in flattened[i]), None)
        assert found is not None, f"the HTML lacks {wanted!r}"
        position = found
    for term in re.findall(r"^- \*\*(.+?)\*\*: (.+)$", md, re.M):
        assert plain(term[0]) in page.texts and plain(term[1]) in page.texts
    assert len(page.images) == len(images) and images, "the same figures"
    for path, source in zip(images, page.images):
        assert (directory / path).read_bytes().startswith(PNG)
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]) == (directory / path).read_bytes()
    captions = re.findall(r"^!\[.*\]\(.+\)\n\n\*(.+)\*$", md, re.M)
    assert len(captions) == len(images) and all(len(c.split()) >= 6 for c in captions), \
        f"every figure has a caption of words, not a file name: {captions}"
    return page


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """A run's page (with metrics), a comparison of two runs that differ in lr and wd, the
    published series' page, and the energy page."""
    root = tmp_path_factory.mktemp("pages")
    measured = [*FAST, "steps=16", "eval_every=4", "checkpoint_every=2", "metrics=[backbone,switching,energy]"]
    first = run_cli("run", "adamw", *measured, "--out", "a", cwd=root)
    assert first.returncode == 0, first.stderr
    second = run_cli("run", "adamw", *measured, "lr=3e-3", "wd=0.1", "--out", "b", cwd=root)
    assert second.returncode == 0, second.stderr
    compared = run_cli("report", "a", "b", "--published", "mini_gpt-beta2-0.99", "--out", "cmp", cwd=root)
    assert compared.returncode == 0, compared.stderr
    published = run_cli("report", "--published", "mini_gpt-beta2", "--out", "pub", cwd=root)
    assert published.returncode == 0, published.stderr
    rows = [{"opt": o, "iter": i, "n_params": 2, "E_tau": e, "E_phi": e * p, "E_perp": e * (1 - p), "p_phi": p,
             "p_perp": 1 - p, "cos_eff": p ** 0.5}
            for o, decay in (("adam", 0.0), ("sgd", 0.2)) for i, e, p in
            ((0, 0.0, float("nan")), (10, 1.0, 0.95 - decay), (20, 2.0, 0.94 - 2 * decay), (30, 3.0, 0.93 - 3 * decay))]
    for row in rows:
        if row["iter"] == 0:
            row.update(E_phi=0.0, E_perp=0.0, p_perp=float("nan"), cos_eff=float("nan"))
    measurement = Measurement(rows, {"adam": [0.0, 1.0, 1.0, 1.0], "sgd": [0.0, 1.0, 1.0, 1.0]},
                              np.array([[3.0, 1.0], [1.0, 3.0]]), ["adam", "sgd"])
    energy_report.write(measurement, root / "energy" / "energy.csv", energy_report.Thresholds(),
                        {"theta0": "the first checkpoint of adam", "phi_hat": "adam's unit final drift"})
    return root


def test_a_run_page_is_the_same_in_markdown_and_html_and_opens_with_its_result(pages):
    page = assert_same_page(pages / "a", "report")
    headline = page.texts[0]
    assert "`adamw`" not in headline and "adamw (lr=0.001" in headline and "completed all 16 steps" in headline
    assert "embedded corpus" in headline and "tiny preset" in headline
    report = json.loads((pages / "a" / "report.json").read_text())
    said = float(re.search(r"val_loss ([0-9.]+) nats", headline).group(1))
    assert said == pytest.approx(report["final"]["val_loss"], rel=5e-3)
    silent = [name for name, result in report["metrics"].items() if result.get("no_signal")]
    assert silent and f"no signal from {', '.join(silent)}" in headline
    assert "PC1 (row-norm.)" in headline.split("no signal")[0]
    for term in ("val_loss", "p_ood", "PC1 (row-norm.)", "cos_eff (final)"):
        assert term in page.texts, term  # defined once, in the terms at the end
    assert "Terms" in page.headings


def test_a_comparison_names_the_settings_that_differ(pages):
    page = assert_same_page(pages / "cmp", "comparison")
    doc = json.loads((pages / "cmp" / "comparison.json").read_text())
    assert doc["varying"] == {"lr": "optimizer.params.lr", "wd": "optimizer.params.wd"}
    assert doc["headline"][0] == "2 runs of 2 configurations differing in lr and wd. All completed (16 steps)."
    header = page.texts[page.texts.index(next(t for t in page.texts if t.startswith("configuration |")))]
    assert header.split(" | ")[:5] == ["configuration", "lr", "wd", "status", "runs"]
    assert any(t.startswith("a | 0.001 | 0.5 |") for t in page.texts) and any(t.startswith("b | 0.003 | 0.1 |")
                                                                             for t in page.texts)
    assert [g["label"] for g in doc["groups"]] == ["a (lr=0.001, wd=0.5)", "b (lr=0.003, wd=0.1)"]
    # energy against a run's own drift has no signal: the cell says so instead of a column of 1s
    assert all(g["no_signal"].get("cos_eff", "").startswith("φ̂ is this run's own final drift") for g in doc["groups"])
    rows = [t for t in page.texts if t.startswith(("a | ", "b | ")) and "PC1" not in t]
    assert sum(t.endswith("| no signal | no signal") for t in rows) == 4, rows  # cos_eff and switch pairs, 2 tables
    assert "highest best p_ood" not in doc["headline"][-1]  # both 0: no best to name


def test_the_published_page_and_the_energy_page(pages):
    page = assert_same_page(pages / "pub", "comparison")
    assert page.texts[0].startswith("5 published series of the source study")
    assert sum(t.startswith("window | gamma_a") for t in page.texts) == 5  # every series' power-law table
    energy = assert_same_page(pages / "energy", "energy")
    assert energy.texts[0].startswith("2 trajectories measured along φ̂ (adam's unit final drift)")
    assert "Verdicts: adam healthy; sgd " in energy.texts[0]
    rows = [t for t in energy.texts if t.startswith(("adam | 0 |", "sgd | 0 |"))]
    assert rows and all(t.endswith("— | — | —") for t in rows), rows  # cos_eff at θ₀ is undefined, not `nan`
    for term in ("E_tau", "E_phi", "p_phi, p_perp", "cos_eff"):
        assert term in energy.texts


def test_pages_render_in_a_browser_without_overflow_and_with_every_figure(pages):
    chromium = browser.find()
    if chromium is None:
        pytest.skip("no Chromium installed (Debian: apt-get install chromium): the pages' layout was not checked")
    for page in [*REFERENCE_PAGES, pages / "a" / "report.html", pages / "cmp" / "comparison.html",
                 pages / "pub" / "comparison.html", pages / "energy" / "energy.html"]:
        seen = browser.layout(chromium, page)
        assert seen["images"] and seen["tables"], page
        assert browser.problems(seen) == [], (page, browser.problems(seen))


def test_the_committed_reference_pages_open_with_a_headline_and_match_their_markdown():
    kinds = {page.stem for page in REFERENCE_PAGES}
    assert kinds == {"comparison", "report", "energy"}, kinds  # every kind of page has a worked example
    for page in REFERENCE_PAGES:
        blocks = assert_same_page(page.parent, page.stem)
        if page.stem == "comparison":
            doc = json.loads((page.parent / "comparison.json").read_text())
            assert blocks.texts[0] == html.unescape(plain(" ".join(doc["headline"])))


@pytest.mark.parametrize("option, value, message", [
    ("--order-by", "nope", "order_by 'nope' is not a column of these runs; allowed: val_loss, best_p_ood, "),
    ("--label-by", "nope", "label_by 'nope' is no optimizer hyperparameter of these runs; allowed: beta1, beta2, "),
])
def test_a_table_setting_the_runs_lack_is_one_line_and_writes_nothing(pages, option, value, message):
    result = run_cli("report", "a", "b", option, value, "--out", "refused", cwd=pages)
    assert result.returncode == 2 and not (pages / "refused").exists()
    assert result.stderr.startswith(f"geobench: error: {message}") and len(result.stderr.splitlines()) == 1
