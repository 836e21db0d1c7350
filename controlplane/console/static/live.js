// The Live page: new model calls arrive over server-sent events (/console/live/stream, with the
// page's filters) and are prepended to the table, newest first, at most data-max-rows rows.
// Rows are built from DOM nodes with textContent only: event data never becomes markup.
// #live-status carries data-state: connecting | open | reconnecting | paused | closed.
(function () {
  "use strict";

  var status = document.getElementById("live-status");
  var table = document.getElementById("live-calls");
  if (!status || !table || typeof window.EventSource === "undefined") { return; }
  var tbody = table.tBodies[0];
  var empty = document.getElementById("live-empty");
  var pauseButton = document.getElementById("live-pause");
  var maxRows = parseInt(status.getAttribute("data-max-rows"), 10) || 200;
  var ws = status.getAttribute("data-ws") || "";
  var seen = new Set();
  var waiting = [];  // rows that arrived while paused, oldest first
  var paused = false;
  var dropped = 0;
  var source = null;

  Array.prototype.forEach.call(tbody.querySelectorAll("tr[data-event-id]"), function (tr) {
    seen.add(tr.getAttribute("data-event-id"));
  });

  function setState(state, text) {
    status.setAttribute("data-state", state);
    status.classList.toggle("error", state === "closed");
    var note = dropped ? " " + dropped + " calls were skipped because the page fell behind." : "";
    status.textContent = text + note;
  }

  function liveText() {
    return "Live: new calls appear at the top as they happen.";
  }

  function cell(text, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    td.textContent = text;
    return td;
  }

  function costText(row) {
    var text = row.cost_usd !== null && row.cost_usd !== undefined
      ? (String(row.cost_usd).charAt(0) === "-" ? "-$" + String(row.cost_usd).slice(1) : "$" + row.cost_usd)
      : row.cost + " " + row.currency;
    return row.priced === false ? text + " (unpriced)" : text;
  }

  function buildRow(row) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-event-id", String(row.event_id));
    tr.setAttribute("data-request-id", row.request_id ? String(row.request_id) : "");
    tr.appendChild(cell(row.time));
    tr.appendChild(cell(row.agent_id || "—"));
    var run = cell(row.run_id ? "" : "—");
    if (row.run_id) {
      var link = document.createElement("a");
      link.href = "/console/runs/" + encodeURIComponent(row.run_id) + "?ws=" + encodeURIComponent(ws);
      link.textContent = row.run_id;
      run.appendChild(link);
    }
    tr.appendChild(run);
    tr.appendChild(cell(row.provider + "/" + row.model));
    var statusCell = cell("", "num");
    var statusText = String(row.status) + (row.error_code ? " " + row.error_code : "");
    if (row.status >= 400 || row.error_code) {
      var badge = document.createElement("span");
      badge.className = "badge bad";
      badge.textContent = statusText;
      statusCell.appendChild(badge);
    } else {
      statusCell.textContent = statusText;
    }
    tr.appendChild(statusCell);
    tr.appendChild(cell(row.latency_ms + " ms", "num"));
    tr.appendChild(cell(row.input_tokens + " / " + row.output_tokens, "num"));
    tr.appendChild(cell(costText(row), "num"));
    var id = cell("");
    var code = document.createElement("code");
    code.textContent = row.request_id || "—";
    id.appendChild(code);
    tr.appendChild(id);
    return tr;
  }

  function show(row) {
    if (seen.has(row.event_id)) { return; }
    seen.add(row.event_id);
    tbody.insertBefore(buildRow(row), tbody.firstChild);
    if (empty) { empty.hidden = true; }
    var rows = tbody.querySelectorAll("tr[data-event-id]");
    for (var i = rows.length - 1; i >= maxRows; i--) {
      seen.delete(rows[i].getAttribute("data-event-id"));
      tbody.removeChild(rows[i]);
    }
  }

  function pausedText() {
    return "Paused: " + waiting.length + " new " + (waiting.length === 1 ? "call" : "calls") + " waiting.";
  }

  function receive(row) {
    if (paused) {
      waiting.push(row);
      if (waiting.length > maxRows) { waiting.shift(); }
      setState("paused", pausedText());
      return;
    }
    show(row);
  }

  function connect() {
    setState("connecting", "Connecting to the live stream…");
    source = new EventSource(status.getAttribute("data-stream"));
    source.onopen = function () {
      if (paused) { setState("paused", pausedText()); } else { setState("open", liveText()); }
    };
    source.onmessage = function (event) {
      var row;
      try { row = JSON.parse(event.data); } catch (e) { return; }
      receive(row);
    };
    source.addEventListener("dropped", function (event) {
      try { dropped += JSON.parse(event.data).dropped || 0; } catch (e) { return; }
      if (paused) { setState("paused", pausedText()); } else { setState("open", liveText()); }
    });
    source.addEventListener("unavailable", function (event) {
      var message = "The live stream is unavailable.";
      try { message = JSON.parse(event.data).message || message; } catch (e) { /* keep the default */ }
      source.close();
      setState("closed", message + " Reload the page to try again.");
    });
    source.addEventListener("closing", function () {
      setState("reconnecting", "The control plane is restarting; reconnecting…");
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        setState("closed", "The live stream stopped (signed out, or too many streams are open). Reload the page to try again.");
      } else if (!paused) {
        setState("reconnecting", "Connection lost; reconnecting…");
      }
    };
  }

  if (pauseButton) {
    pauseButton.hidden = false;
    pauseButton.addEventListener("click", function () {
      paused = !paused;
      pauseButton.setAttribute("aria-pressed", paused ? "true" : "false");
      pauseButton.textContent = paused ? "Resume" : "Pause";
      if (paused) {
        setState("paused", pausedText());
        return;
      }
      var held = waiting;
      waiting = [];
      held.forEach(show);
      setState(source && source.readyState === EventSource.OPEN ? "open" : "reconnecting",
               source && source.readyState === EventSource.OPEN ? liveText() : "Reconnecting…");
    });
  }

  window.addEventListener("pagehide", function () { if (source) { source.close(); } });
  connect();
})();
