"""Geobench's HTML pages in a real browser: Debian's headless Chromium lays a page out, a script added
to a copy of it measures what a reader sees (page width, every table against its box, every image
decoded), and a full-page screenshot is taken at the page's own height.

Used by tests/test_pages.py, and from the command line for the screenshots in docs/screenshots/:

    python tests/browser.py PAGE.html SHOT.png [WIDTH]
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
# no background traffic (a closed network refuses it), no profile left behind
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1", "--virtual-time-budget=10000")

MEASURE = """<script>
window.addEventListener('load', () => {
  const root = document.documentElement;
  const out = {viewport: root.clientWidth, page_width: root.scrollWidth, height: root.scrollHeight,
               tables: [], images: []};
  for (const table of document.querySelectorAll('table')) {
    const box = table.parentElement;
    out.tables.push({header: table.rows[0] ? table.rows[0].innerText.slice(0, 60) : '',
                     width: table.scrollWidth, box_width: box.clientWidth,
                     box_right: box.getBoundingClientRect().right,
                     scrolls: ['auto', 'scroll'].includes(getComputedStyle(box).overflowX)});
  }
  for (const img of document.images) {
    out.images.push({alt: img.alt, loaded: img.complete && img.naturalWidth > 0, width: img.naturalWidth});
  }
  const pre = document.createElement('pre');
  pre.id = 'geobench-layout';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def find() -> str | None:
    """The path of an installed Chromium, or None."""
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _chromium(binary: str, *args: str, timeout: float = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def layout(binary: str, page: Path, width: int = 1280) -> dict:
    """What a reader of `page` sees at `width` pixels: the page's width and height, each table's
    width against its box (and whether the box scrolls), each image and whether it decoded."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / page.name
        copy.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
        dom = _chromium(binary, f"--window-size={width},900", "--dump-dom", copy.as_uri())
    found = re.search(r'<pre id="geobench-layout">(.*?)</pre>', dom, re.S)
    if not found:
        raise RuntimeError("the page's layout was not reported (did it load?)")
    return json.loads(found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


def problems(seen: dict) -> list[str]:
    """What a reader would find wrong: a page wider than the window, a table wider than its box
    that does not scroll, or spilling past the window, an image that did not load."""
    out = []
    if seen["page_width"] > seen["viewport"]:
        out.append(f"the page is {seen['page_width']} px wide in a {seen['viewport']} px window")
    for table in seen["tables"]:
        if table["width"] > table["box_width"] and not table["scrolls"]:
            out.append(f"table '{table['header']}' is {table['width']} px in a {table['box_width']} px box")
        if table["box_right"] > seen["viewport"]:
            out.append(f"table '{table['header']}' ends at {table['box_right']:.0f} px, past the window")
    out += [f"image '{img['alt']}' did not load" for img in seen["images"] if not img["loaded"]]
    return out


def screenshot(binary: str, page: Path, shot: Path, width: int = 1280) -> Path:
    """A full-page PNG of `page` at `width` pixels."""
    height = layout(binary, page, width)["height"]
    shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(binary, f"--window-size={width},{height}", f"--screenshot={shot.resolve()}", page.resolve().as_uri())
    return shot


if __name__ == "__main__":
    chromium = find()
    if chromium is None:
        sys.exit("no Chromium found (Debian: apt-get install chromium)")
    print(screenshot(chromium, Path(sys.argv[1]), Path(sys.argv[2]), *(int(a) for a in sys.argv[3:4])))
