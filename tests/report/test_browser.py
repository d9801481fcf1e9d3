"""The quick report as a reader meets it: Chromium (Debian's, driven by Playwright, no browser download)
opens the index and every section page from file:// with the network blocked. Reuses the session's quick
report (conftest.py). Screenshots of what it saw are left in the test's temporary folder."""

import json
import os

import pytest

from disentangle.report import browser

NEEDS = browser.unavailable()


@pytest.fixture(scope="module")
def pages(quick, tmp_path_factory):
    if NEEDS:
        if os.environ.get("CI") == "true":  # CI installs Chromium (.ci/run): never skipped there
            pytest.fail(f"CI=true but the browser test cannot run: {NEEDS}")
        pytest.skip(NEEDS)
    shots = tmp_path_factory.mktemp("screenshots")
    return {p.name: p for p in browser.check_pages(quick, shots)}


@pytest.mark.slow
def test_every_page_opens_cleanly_offline(pages, quick):
    assert set(pages) == {p.name for p in browser.report_pages(quick)}
    assert len(pages) > 1
    for name, page in pages.items():
        assert page.problems == [], name  # console errors, failed requests, undecoded images, dead links


@pytest.mark.slow
def test_every_figure_decodes_and_every_link_resolves(pages, quick):
    sections = sorted(p.name for p in quick.glob("[0-9][0-9]_*.html"))
    assert pages["index.html"].images >= 1  # the summary figure
    assert set(sections) <= set(pages["index.html"].links)
    for name in sections:
        # the navigation bar links the index and every section page
        assert set(pages[name].links) >= {"index.html", *sections}, name
    assert sum(p.images for p in pages.values()) > len(pages)


@pytest.mark.slow
def test_the_findings_table_has_one_row_per_recorded_finding(pages, quick):
    recorded = 0
    from disentangle.report.run import FINDINGS_SECTIONS

    for section in FINDINGS_SECTIONS:  # 08, 09 and 11
        path = quick / "results" / f"{section}.json"
        if path.exists():
            recorded += len(json.loads(path.read_text()).get("findings") or [])
    assert recorded > 0
    assert pages["index.html"].findings_rows == recorded


@pytest.mark.slow
def test_folded_code_expands_on_click(pages):
    sections = [p for name, p in pages.items() if name != "index.html"]
    assert all(p.code_folds > 0 for p in sections)
    assert all(p.fold_opens for p in sections), [p.name for p in sections if not p.fold_opens]


@pytest.mark.slow
def test_a_screenshot_of_every_page(pages):
    for page in pages.values():
        data = page.screenshot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", page.name
        height = int.from_bytes(data[20:24], "big")
        assert height >= 900, page.name  # full page: at least the viewport's height
