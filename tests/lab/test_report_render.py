"""The report rendered in headless Chromium: every image loads and the summary lists every experiment.

The report itself has no JavaScript; the test renders a copy with a small inline check appended,
and reads the result back from ``chromium --dump-dom``.
"""
from __future__ import annotations

import html.parser
import shutil
import subprocess

import pytest

from normlab.lab import experiments

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium; "
                                                         ".ci/run installs it)")

CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = Array.from(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.src; });
  var out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = "images=" + imgs.length + " broken=" + bad.length + " " + bad.join(" ");
  document.body.appendChild(out);
});
</script>"""


class _Rows(html.parser.HTMLParser):
    """First-column texts of the summary table, and the render-check result."""

    def __init__(self):
        super().__init__()
        self.rows, self.check, self._in_table, self._col, self._in_check, self._cell = [], "", False, 0, False, ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id") == "summary-table":
            self._in_table = True
        elif self._in_table and tag == "tr":
            self._col, self._cell = 0, ""
        elif self._in_table and tag == "td":
            self._col += 1
        elif tag == "pre" and attrs.get("id") == "render-check":
            self._in_check = True

    def handle_endtag(self, tag):
        if tag == "table" and self._in_table:
            self._in_table = False
        elif self._in_table and tag == "td" and self._col == 1:
            self.rows.append(self._cell.strip())
        elif tag == "pre":
            self._in_check = False

    def handle_data(self, data):
        if self._in_table and self._col == 1:
            self._cell += data
        if self._in_check:
            self.check += data


def test_report_renders_with_every_image_and_experiment(smoke_report, tmp_path):
    out, _ = smoke_report
    page = (out / "index.html").read_text()
    assert "<script" not in page.lower(), "the report needs no JavaScript"
    check_page = out / "render-check.html"
    check_page.write_text(page.replace("</body>", CHECK + "</body>"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--allow-file-access-from-files",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
           check_page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    parser = _Rows()
    parser.feed(dom)
    assert parser.check.startswith("images="), f"the page did not finish loading: {dom[-500:]}"
    n_images = int(parser.check.split()[0].split("=")[1])
    assert n_images >= len(experiments.names()) and " broken=0" in parser.check, parser.check
    assert parser.rows == experiments.names()
