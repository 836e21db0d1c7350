"""The console's static contract: the pinned Chart.js is the file we vetted, templates carry no
inline script or style (the CSP forbids them), and the helpers that put data into pages cannot be
used to break out of them."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from controlplane.console import STATIC
from controlplane.console.auth import safe_next
from controlplane.console.render import CSP, as_json, usd

CHART_JS = STATIC / "vendor" / "chart-4.5.1.umd.min.js"
CHART_JS_SHA256 = "48444a82d4edcb5bec0f1965faacdde18d9c17db3063d042abada2f705c9f54a"  # chart.js@4.5.1 from npm
TEMPLATES = Path(STATIC).parent / "templates"


def test_the_vendored_chart_js_is_the_pinned_release() -> None:
    assert hashlib.sha256(CHART_JS.read_bytes()).hexdigest() == CHART_JS_SHA256
    assert CHART_JS.read_text()[:60].splitlines()[1].strip() == "* Chart.js v4.5.1"
    assert (STATIC / "vendor" / "chart.js-LICENSE.md").read_text().startswith("The MIT License")
    assert 'src="/console/static/vendor/chart-4.5.1.umd.min.js"' in (TEMPLATES / "base.html").read_text()


@pytest.mark.parametrize("template", sorted(p.name for p in TEMPLATES.glob("*.html")))
def test_templates_have_no_inline_script_or_style(template: str) -> None:
    html = (TEMPLATES / template).read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag or 'type="application/json"' in tag, tag
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html), template


def test_the_csp_allows_only_the_consoles_own_scripts_and_styles() -> None:
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"


def test_json_for_a_page_cannot_close_its_script_element() -> None:
    value = {"name": "</script><script>alert(1)</script>", "amp": "a&b", "n": 5}
    text = as_json(value)
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == value


@pytest.mark.parametrize(("target", "expected"), [
    ("/console/runs?ws=demo", "/console/runs?ws=demo"), (None, "/console"), ("", "/console"),
    ("https://evil.example/console", "/console"), ("//evil.example/console", "/console"),
    ("/admin/v1/keys", "/console"), ("/console\\@evil", "/console"), ("javascript:alert(1)", "/console"),
])
def test_sign_in_returns_only_to_a_console_path(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected


def test_money_is_shown_exactly() -> None:
    assert (usd("0.0000048"), usd("-0.5"), usd("12"), usd(None)) == ("$0.0000048", "-$0.5", "$12", "—")
