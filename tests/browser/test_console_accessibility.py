"""Accessibility of the console: every control has a name, the keyboard reaches everything from a
skip link, text meets WCAG AA contrast (4.5:1) in both themes, and the theme choice sticks."""

from __future__ import annotations

import pytest

from controlplane.console.render import NAV
from tests.browser.conftest import Console, shot

pytestmark = pytest.mark.browser

PAGES = [href for _, _, href in NAV]

UNNAMED = """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button, a[href]')]
  .filter(e => e.offsetParent !== null)
  .filter(e => {
    const labelled = (e.labels && e.labels.length) || e.getAttribute('aria-label') || e.getAttribute('aria-labelledby');
    const text = (e.innerText || e.value || '').trim();
    return e.matches('input, select, textarea') ? !labelled : !(labelled || text);
  })
  .map(e => e.outerHTML.slice(0, 120))"""

# Contrast ratio (WCAG 2) of an element's text colour against its page or button background.
CONTRAST = """(selector) => {
  const rgb = s => s.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = c => {
    const [r, g, b] = c.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const bgOf = e => {
    for (; e; e = e.parentElement) {
      const c = getComputedStyle(e).backgroundColor;
      if (c && !c.startsWith('rgba(0, 0, 0, 0)') && c !== 'transparent') return c;
    }
    return getComputedStyle(document.documentElement).backgroundColor;
  };
  return [...document.querySelectorAll(selector)].filter(e => e.offsetParent !== null).map(e => {
    const a = lum(rgb(getComputedStyle(e).color)), b = lum(rgb(bgOf(e)));
    return [e.tagName + '.' + e.className, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
  });
}"""
TEXT = "h1, h2, h3, p, td, th, a, label, button, .who, .sub, figcaption, summary"


async def test_every_control_on_every_page_has_a_name(console: Console) -> None:
    for path in PAGES:
        page = await console.open(path)
        assert await page.evaluate(UNNAMED) == [], path


async def test_the_keyboard_starts_at_a_skip_link_and_reaches_the_navigation(console: Console) -> None:
    page = await console.open("/console")
    reached = []
    for _ in range(16):
        await page.keyboard.press("Tab")
        reached.append(await page.evaluate("document.activeElement.textContent.trim()"))
    assert reached[0] == "Skip to content"
    labels = [label for _, label, _ in NAV]
    assert [r for r in reached if r in labels] == labels  # every page, in order
    assert "Sign out" in reached
    await page.reload()
    await page.keyboard.press("Tab")
    await page.keyboard.press("Enter")
    assert await page.evaluate("document.activeElement.id") == "main"


@pytest.mark.parametrize("theme", ["light", "dark"])
async def test_text_meets_aa_contrast_in_both_themes(console: Console, theme: str) -> None:
    await console.page.add_init_script(f"localStorage.setItem('alephant-theme', '{theme}')")
    for path in PAGES:
        page = await console.open(path)
        assert await page.evaluate("document.documentElement.dataset.theme") == theme
        low = [(what, round(ratio, 2)) for what, ratio in await page.evaluate(CONTRAST, TEXT) if ratio < 4.5]
        assert low == [], (path, theme, low[:5])


async def test_the_theme_toggle_switches_and_sticks(console: Console) -> None:
    page = await console.open("/console")
    before = await page.evaluate("document.documentElement.dataset.theme")
    toggle = page.locator("#theme-toggle")
    await toggle.click()
    after = await page.evaluate("document.documentElement.dataset.theme")
    assert {before, after} == {"light", "dark"}
    assert await toggle.get_attribute("aria-pressed") == ("true" if after == "dark" else "false")
    await page.reload()
    assert await page.evaluate("document.documentElement.dataset.theme") == after
    if after != "dark":
        await toggle.click()
    await shot(page, "overview-dark")
