// Progressive enhancement for the console: the theme toggle, the charts (drawn by Chart.js from
// the JSON blocks the server renders; every chart also has a table), and the pages' own hooks.
(function () {
  "use strict";

  function setTheme(dark) {
    document.documentElement.setAttribute("data-theme", dark ? "dark" : "light");
    try { window.localStorage.setItem("alephant-theme", dark ? "dark" : "light"); } catch (e) { /* private mode */ }
    var toggle = document.getElementById("theme-toggle");
    if (toggle) {
      toggle.setAttribute("aria-pressed", dark ? "true" : "false");
      toggle.textContent = dark ? "Light theme" : "Dark theme";
    }
    window.dispatchEvent(new Event("alephant-theme"));
  }

  var toggle = document.getElementById("theme-toggle");
  if (toggle) {
    setTheme(document.documentElement.getAttribute("data-theme") === "dark");
    toggle.addEventListener("click", function () {
      setTheme(document.documentElement.getAttribute("data-theme") !== "dark");
    });
  }

  // Money in the charts travels as integer nano-USD; only the axis labels divide.
  function usdLabel(nanos) {
    var usd = nanos / 1e9;
    if (usd === 0) { return "$0"; }
    if (Math.abs(usd) >= 1) { return "$" + usd.toFixed(2); }
    // Two significant digits, never exponent notation (at most 9 decimals: one nano-USD).
    var decimals = Math.min(9, 1 - Math.floor(Math.log10(Math.abs(usd))));
    return "$" + usd.toFixed(decimals);
  }

  var PALETTE = ["#2563eb", "#d97706", "#059669", "#db2777", "#7c3aed", "#0891b2", "#65a30d", "#dc2626", "#6b7280"];

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function stackedChart(canvas, data) {
    if (typeof Chart === "undefined") { return null; }
    var datasets = data.series.map(function (s, i) {
      return { label: s.name, data: s.values, backgroundColor: PALETTE[i % PALETTE.length], stack: "cost" };
    });
    return new Chart(canvas, {
      type: "bar",
      data: { labels: data.labels, datasets: datasets },
      options: {
        responsive: true, maintainAspectRatio: false, animation: false,
        scales: {
          x: { stacked: true, ticks: { color: css("--muted") }, grid: { color: css("--grid") } },
          y: { stacked: true, ticks: { color: css("--muted"), callback: usdLabel }, grid: { color: css("--grid") } }
        },
        plugins: {
          legend: { labels: { color: css("--fg") } },
          tooltip: { callbacks: { label: function (ctx) { return ctx.dataset.label + ": " + usdLabel(ctx.parsed.y); } } }
        }
      }
    });
  }

  var charts = [];
  document.querySelectorAll("canvas[id]").forEach(function (canvas) {
    var source = document.getElementById(canvas.id + "-data");
    if (!source) { return; }
    var data = JSON.parse(source.textContent);
    var chart = stackedChart(canvas, data);
    if (chart) { charts.push(chart); }
  });
  window.addEventListener("alephant-theme", function () {
    charts.forEach(function (chart) {
      ["x", "y"].forEach(function (axis) {
        chart.options.scales[axis].ticks.color = css("--muted");
        chart.options.scales[axis].grid.color = css("--grid");
      });
      chart.options.plugins.legend.labels.color = css("--fg");
      chart.update();
    });
  });

  // Buttons that need a confirmation (revoke, reject, ...) carry data-confirm.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });

  window.AlephantConsole = { usdLabel: usdLabel };
})();
