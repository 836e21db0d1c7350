// Applies the saved theme before the page paints (light, dark, or the system's when unset).
(function () {
  var saved = null;
  try { saved = window.localStorage.getItem("alephant-theme"); } catch (e) { saved = null; }
  var dark = saved ? saved === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.setAttribute("data-theme", dark ? "dark" : "light");
})();
