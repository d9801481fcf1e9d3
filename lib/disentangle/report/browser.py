"""The rendered report as a browser shows it: Playwright driving the system's Chromium, offline.

Opens the index and every section page from ``file://`` with every other request refused, and records per
page what a reader would meet: console errors, failed requests, images that did not decode, links (in
the navigation bar, and every link on the index) to pages that do not exist, the rows of the findings
tables, whether folded code opens on a click, and a full-page screenshot. Used by the runner (screenshots
under ``reports/<profile>/screenshots/``) and by ``tests/report/test_browser.py`` (which asserts).

No browser is downloaded: Debian's ``chromium`` package (``apt-get install -y chromium``) provides it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

CHROMIUM = Path(os.environ.get("DISENTANGLE_CHROMIUM", "/usr/bin/chromium"))
INSTALL = "apt-get install -y chromium"
# Without the background-networking flags Chromium starts connections of its own (updates, sync) that a
# closed network refuses, which would show up as failed requests of no page.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass
class Page:
    name: str  # file name, e.g. "index.html"
    screenshot: Path
    problems: list[str] = field(default_factory=list)  # empty: nothing a reader would notice
    images: int = 0  # <img> elements, all decoded unless a problem says otherwise
    links: list[str] = field(default_factory=list)  # checked hrefs (navigation bar; every link on the index)
    findings_rows: int = 0  # rows of the findings tables (index only)
    code_folds: int = 0  # <details class="code-fold"> elements
    fold_opens: bool | None = None  # the first fold opened on a click (None: the page has none)


def unavailable() -> str | None:
    """Why the browser cannot run here (with the command that fixes it), or None when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright; no browser download needed)"
    if not CHROMIUM.exists():
        return f"Chromium not found at {CHROMIUM}: install it with `sudo {INSTALL}`"
    return None


def report_pages(folder: Path) -> list[Path]:
    """The index first, then the section pages in order."""
    return [folder / "index.html", *sorted(folder.glob("[0-9][0-9]_*.html"))]


def _local_target(href: str, page: Path) -> Path | None:
    """The file a link points to, or None for a link within the page."""
    url = urlparse(href)
    if url.scheme == "file":
        return Path(unquote(url.path))
    if url.scheme or href.startswith("#"):
        return None
    return (page.parent / unquote(url.path)).resolve()


def check_pages(folder: Path, screenshots: Path) -> list[Page]:
    """Open every page of the report in ``folder``; a screenshot of each goes to ``screenshots/<page>.png``."""
    from playwright.sync_api import sync_playwright

    screenshots.mkdir(parents=True, exist_ok=True)
    results = []
    profile_dir = tempfile.mkdtemp(prefix="disentangle-chromium-")  # a fresh profile: nothing remembered
    try:
        with sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(profile_dir, executable_path=str(CHROMIUM), args=ARGS,
                                                            headless=True, viewport={"width": 1280, "height": 900})
            # The network is blocked: only the report's own files (and inline data: URIs) may load.
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(("file:", "data:"))
                          else route.abort("blockedbyclient"))
            for path in report_pages(folder):
                results.append(_check(context, path, screenshots / f"{path.stem}.png"))
            context.close()
    finally:
        shutil.rmtree(profile_dir, ignore_errors=True)
    return results


def _check(context, path: Path, shot: Path) -> Page:
    result = Page(path.name, shot)
    page = context.new_page()
    page.on("console", lambda m: result.problems.append(f"console error: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: result.problems.append(f"script error: {e}"))
    page.on("requestfailed", lambda r: result.problems.append(f"request failed: {r.url[:120]} ({r.failure})"))
    page.goto(path.resolve().as_uri(), wait_until="load")
    images = page.evaluate("""() => Array.from(document.images).map(i => ({
        ok: i.complete && i.naturalWidth > 0, what: i.alt ? i.alt.slice(0, 60) : i.src.slice(0, 60)}))""")
    result.images = len(images)
    result.problems += [f"image not decoded: {i['what']}" for i in images if not i["ok"]]
    selector = "a[href]" if path.name == "index.html" else "nav.report-nav a[href]"
    hrefs = page.eval_on_selector_all(selector, "els => els.map(a => a.getAttribute('href'))")
    if path.name != "index.html" and not hrefs:
        result.problems.append("no navigation bar")
    for href in hrefs:
        target = _local_target(href, path)
        if target is None:
            continue
        result.links.append(href)
        if not target.is_file():
            result.problems.append(f"link to a missing page: {href}")
    result.findings_rows = page.locator("table.findings tbody tr").count()
    folds = page.locator("details.code-fold")
    result.code_folds = folds.count()
    if result.code_folds:
        first = folds.first
        first.locator("summary").click()
        result.fold_opens = bool(first.evaluate("d => d.open")) and first.locator("pre").first.is_visible()
        first.locator("summary").click()  # folded again for the screenshot, as a reader first sees it
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    return result
