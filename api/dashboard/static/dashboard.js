/* qaas dashboard: live updates for server-rendered pages. Plain JS, no dependencies, no build step.
 *
 * Jobs list: follows /dashboard/jobs/stream (Server-Sent Events, one `job` event per changed job,
 * carrying the re-rendered row), falling back to polling /dashboard/jobs.json.
 * Job page: follows /dashboard/jobs/{id}/events (the job's own event stream), updates the progress
 * bar, event log and per-layer error chart as events arrive, and swaps in the server-rendered
 * status panel (/dashboard/jobs/{id}/live) when the stage or status changes.
 */
(function () {
  "use strict";

  var POLL_MS = 3000;
  var skewMs = 0; // server clock minus browser clock

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function parseTime(s) { if (!s) return null; var t = Date.parse(s); return isNaN(t) ? null : t; }
  function now() { return Date.now() + skewMs; }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || seconds < 0 || !isFinite(seconds)) return "–";
    var s = Math.round(seconds);
    if (s < 60) return seconds < 10 ? seconds.toFixed(1) + " s" : s + " s";
    var m = Math.floor(s / 60); s = s % 60;
    if (m < 60) return m + " min " + (s < 10 ? "0" : "") + s + " s";
    var h = Math.floor(m / 60); m = m % 60;
    return h + " h " + (m < 10 ? "0" : "") + m + " min";
  }

  function optFloat(s) { return s === null || s === "" ? null : parseFloat(s); }

  /* Elapsed time and ETA, from the data-* attributes of a row or the job summary. The ETA is the whole
   * job's time left: the current stage's rest at the rate seen so far in it (or its typical duration less
   * the time spent, before it reports progress), plus the typical durations of the stages after it -- the
   * same formula as the server's (api/dashboard/eta.py), which renders the two typical figures. */
  function tickHolder(holder) {
    var started = parseTime(holder.getAttribute("data-started"));
    var finished = parseTime(holder.getAttribute("data-finished"));
    var stageStarted = parseTime(holder.getAttribute("data-stage-started"));
    var status = holder.getAttribute("data-status");
    var p = parseFloat(holder.getAttribute("data-progress") || "0");
    var t = now();
    $all("[data-tick=elapsed]", holder).forEach(function (el) {
      el.textContent = started ? duration(((finished || t) - started) / 1000) : "–";
    });
    var typical = optFloat(holder.getAttribute("data-eta-typical"));
    var rest = optFloat(holder.getAttribute("data-eta-rest"));
    $all("[data-tick=eta]", holder).forEach(function (el) {
      var eta = null;
      if (status === "running" && rest !== null) {
        var spent = stageStarted ? Math.max(0, (t - stageStarted) / 1000) : 0;
        var left = null;
        if (p >= 0.01 && p < 1) left = spent * (1 - p) / p;
        else if (typical !== null) left = Math.max(0, typical - spent);
        if (left !== null) eta = left + rest;
      }
      el.textContent = eta === null ? "–" : "~" + duration(eta);
    });
  }

  function tick() {
    $all("tr.job-row, .summary").forEach(tickHolder);
    $all(".timeline li.current").forEach(function (li) {
      var since = parseTime(li.getAttribute("data-since"));
      var el = $("[data-tick=since]", li);
      if (since && el) el.textContent = duration((now() - since) / 1000) + " (running)";
    });
  }

  function setLiveState(text) {
    var el = $("#live-state");
    if (el && el.textContent !== text) el.textContent = text;
  }

  function fromHTML(html) {
    var tpl = document.createElement("template");
    tpl.innerHTML = html.trim();
    return tpl.content;
  }

  /* Replace `oldEl` by `newEl`, keeping keyboard focus on the equivalent control. */
  function swapKeepingFocus(container, apply) {
    var active = document.activeElement;
    var key = null;
    if (active && container.contains(active)) {
      key = active.id ? "#" + active.id : (active.getAttribute("href") ? "[href='" + active.getAttribute("href") + "']" : null);
      if (!key && active.form) key = "form[action='" + active.form.getAttribute("action") + "'] button";
    }
    var root = apply();
    if (key) { var again = $(key, root || container); if (again) again.focus(); }
  }

  // --- jobs list ----------------------------------------------------------------------------------

  function initList() {
    var table = $("#jobs-table");
    if (!table) return;
    var since = table.getAttribute("data-since");
    var renderedAt = parseTime(since);
    if (renderedAt) skewMs = renderedAt - Date.now();
    var filter = table.getAttribute("data-status-filter");
    var firstPage = table.getAttribute("data-first-page") === "true";
    var body = $("#jobs-body");

    function upsert(row) {
      if (row.counts) {
        var total = 0;
        Object.keys(row.counts).forEach(function (k) {
          total += row.counts[k];
          var el = $("[data-count='" + k + "']"); if (el) el.textContent = String(row.counts[k]);
        });
        var all = $("[data-count=all]"); if (all) all.textContent = String(total);
      }
      var existing = document.getElementById("job-" + row.id);
      var frag = fromHTML(row.html);
      var fresh = frag.firstElementChild;
      if (existing) {
        swapKeepingFocus(existing, function () { existing.replaceWith(fresh); return fresh; });
      } else if (firstPage && (!filter || filter === row.status) && parseTime(row.created_iso) >= renderedAt - 1000) {
        fresh.classList.add("new-row");
        body.insertBefore(fresh, body.firstChild);
        var empty = $("#empty"); if (empty) empty.remove();
      }
    }

    var polling = null;
    function poll() {
      fetch("/dashboard/jobs.json?since=" + encodeURIComponent(since), { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) {
          if (r.status === 401) { window.location.href = "/dashboard/login"; throw new Error("signed out"); }
          return r.json();
        })
        .then(function (data) { data.rows.forEach(upsert); since = data.since; setLiveState("Updates live (polling every " + POLL_MS / 1000 + " s)."); })
        .catch(function () { setLiveState("Cannot reach the server; retrying…"); });
    }
    function startPolling() {
      if (polling) return;
      setLiveState("Updates live (polling every " + POLL_MS / 1000 + " s).");
      poll();
      polling = setInterval(poll, POLL_MS);
    }

    if (!window.EventSource) { startPolling(); return; }
    var es = new EventSource("/dashboard/jobs/stream?since=" + encodeURIComponent(since));
    var failures = 0;
    es.addEventListener("open", function () { failures = 0; setLiveState("Updates live."); });
    es.addEventListener("job", function (ev) {
      var row = JSON.parse(ev.data);
      if (ev.lastEventId) since = ev.lastEventId;
      upsert(row);
    });
    es.addEventListener("signed-out", function () { es.close(); window.location.href = "/dashboard/login"; });
    es.addEventListener("error", function () {
      failures += 1;
      if (es.readyState === EventSource.CLOSED || failures >= 3) { es.close(); startPolling(); }
      else setLiveState("Reconnecting…");
    });
  }

  // --- per-layer error chart ---------------------------------------------------------------------

  var SVG = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs, text) {
    var el = document.createElementNS(SVG, name);
    for (var k in attrs) el.setAttribute(k, attrs[k]);
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function Chart(container, points) {
    this.container = container;
    this.points = [];
    this.index = {};
    this.add(points || []);
  }
  Chart.prototype.add = function (points) {
    var self = this;
    points.forEach(function (p) {
      if (typeof p.rel_error !== "number") return;
      if (self.index.hasOwnProperty(p.layer)) self.points[self.index[p.layer]].rel_error = p.rel_error;
      else { self.index[p.layer] = self.points.length; self.points.push({ layer: p.layer, rel_error: p.rel_error }); }
    });
  };
  Chart.prototype.draw = function () {
    var pts = this.points, c = this.container;
    if (!pts.length) return;
    var W = 900, H = 220, L = 56, R = 10, T = 12, B = 30;
    var pw = W - L - R, ph = H - T - B;
    var max = 0, worst = 0, sum = 0;
    pts.forEach(function (p, i) { sum += p.rel_error; if (p.rel_error > max) { max = p.rel_error; worst = i; } });
    var top = max > 0 ? max * 1.1 : 1;
    var svg = svgEl("svg", { viewBox: "0 0 " + W + " " + H, "aria-hidden": "true", focusable: "false" });
    [0, 0.5, 1].forEach(function (f) {
      var y = T + ph - f * ph;
      svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: y, y2: y, class: "axis", "stroke-dasharray": f ? "3 3" : "" }));
      svg.appendChild(svgEl("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, (top * f).toFixed(4)));
    });
    var bw = pw / pts.length;
    pts.forEach(function (p, i) {
      var h = Math.max(1, p.rel_error / top * ph);
      var rect = svgEl("rect", { x: (L + i * bw + bw * 0.1).toFixed(2), y: (T + ph - h).toFixed(2),
        width: Math.max(1, bw * 0.8).toFixed(2), height: h.toFixed(2), class: "bar" + (i === worst ? " worst" : "") });
      rect.appendChild(svgEl("title", {}, p.layer + ": " + p.rel_error.toFixed(5)));
      svg.appendChild(rect);
    });
    var step = Math.max(1, Math.ceil(pts.length / 12));
    for (var i = 0; i < pts.length; i += step) {
      svg.appendChild(svgEl("text", { x: (L + (i + 0.5) * bw).toFixed(2), y: H - 10, "text-anchor": "middle" }, String(i + 1)));
    }
    svg.appendChild(svgEl("text", { x: W - R, y: H - 10 + 0, "text-anchor": "end" }, "layer →"));
    c.textContent = "";
    c.appendChild(svg);
    var caption = document.createElement("p");
    caption.className = "sub";
    caption.textContent = pts.length + " layers · mean " + (sum / pts.length).toFixed(5) + " · max " + max.toFixed(5) + " (" + pts[worst].layer + ")";
    c.appendChild(caption);
    c.setAttribute("aria-label", "Per-layer relative quantization error: " + pts.length + " layers, mean " +
      (sum / pts.length).toFixed(4) + ", max " + max.toFixed(4) + " at " + pts[worst].layer + ". Values in the table below.");
    var rows = $("#error-rows"), count = $("#error-count");
    if (rows) {
      rows.textContent = "";
      pts.forEach(function (p) {
        var tr = document.createElement("tr");
        var a = document.createElement("td"); a.className = "mono"; a.textContent = p.layer;
        var b = document.createElement("td"); b.className = "num"; b.textContent = p.rel_error.toFixed(5);
        tr.appendChild(a); tr.appendChild(b); rows.appendChild(tr);
      });
    }
    if (count) count.textContent = String(pts.length);
  };

  /* The worker's metric shapes: bitsandbytes {"rel_error": {layer: err}}, GPTQ {"layers": {layer: {"rel_error"}}},
   * or a single {"layer", "rel_error"}. */
  function metricPoints(m) {
    var out = [];
    if (!m || typeof m !== "object") return out;
    if (m.rel_error && typeof m.rel_error === "object") {
      Object.keys(m.rel_error).forEach(function (k) { out.push({ layer: k, rel_error: m.rel_error[k] }); });
    } else if (typeof m.rel_error === "number" && m.layer) {
      out.push({ layer: String(m.layer), rel_error: m.rel_error });
    }
    if (m.layers && typeof m.layers === "object") {
      Object.keys(m.layers).forEach(function (k) {
        var v = m.layers[k];
        if (v && typeof v.rel_error === "number") out.push({ layer: k, rel_error: v.rel_error });
      });
    }
    return out;
  }

  // --- job page -----------------------------------------------------------------------------------

  function initJob() {
    var live = $("#job-live");
    if (!live) return;
    var jobId = live.getAttribute("data-job-id");
    var lastId = parseInt(live.getAttribute("data-last-event") || "0", 10);
    var serverNow = parseTime(live.getAttribute("data-now"));
    if (serverNow) skewMs = serverNow - Date.now();
    var status = live.getAttribute("data-status");
    var chartData = [];
    try { chartData = JSON.parse(($("#layer-errors-data") || {}).textContent || "[]"); } catch (e) { chartData = []; }
    var chart = new Chart($("#error-chart"), chartData);
    chart.draw();
    var eventsBody = $("#events-body");
    var lastSpoken = 0, lastCurve = 0;
    var logWrap = eventsBody && eventsBody.closest(".log-wrap");
    if (logWrap) logWrap.scrollTop = logWrap.scrollHeight;  // newest events at the bottom, in view

    function terminal(s) { return s === "succeeded" || s === "failed" || s === "cancelled"; }

    var refreshing = false, again = false;
    function refreshLive() {
      if (refreshing) { again = true; return; }
      refreshing = true;
      fetch("/dashboard/jobs/" + jobId + "/live", { credentials: "same-origin" })
        .then(function (r) {
          if (r.status === 401) { window.location.href = "/dashboard/login"; throw new Error("signed out"); }
          status = r.headers.get("X-Job-Status") || status;
          return r.text();
        })
        .then(function (html) {
          swapKeepingFocus(live, function () { live.textContent = ""; live.appendChild(fromHTML(html)); return live; });
          live.setAttribute("data-status", status);
          if (terminal(status)) {
            var pt = $("#progress-text"); if (pt) pt.textContent = "Job " + status + ".";
          }
          tick();
        })
        .catch(function () {})
        .then(function () { refreshing = false; if (again) { again = false; refreshLive(); } });
    }

    function appendEvent(e) {
      if (!eventsBody) return;
      var wrap = eventsBody.closest(".log-wrap");
      var stick = wrap && wrap.scrollHeight - wrap.scrollTop - wrap.clientHeight < 40;
      var tr = document.createElement("tr");
      tr.className = "ev-" + e.kind;
      tr.setAttribute("data-event-id", e.id);
      var t = new Date(parseTime(e.created_at) || Date.now()).toISOString().substr(11, 12);
      [t, e.kind, e.stage || "", e.message || ""].forEach(function (v, i) {
        var td = document.createElement("td"); if (i === 0) td.className = "mono"; td.textContent = v; tr.appendChild(td);
      });
      eventsBody.appendChild(tr);
      while (eventsBody.children.length > 1000) eventsBody.removeChild(eventsBody.firstChild);
      if (stick) wrap.scrollTop = wrap.scrollHeight;
    }

    function onProgress(e) {
      var d = e.data || {};
      var frac = d.total ? d.done / d.total : null;
      var bar = $("#job-progress");
      if (bar && frac !== null) bar.value = frac;
      var pct = $("#progress-pct");
      if (pct && frac !== null) pct.textContent = Math.round(frac * 100) + "%";
      var label = $("#progress-label");
      if (label && e.stage) label.textContent = e.stage;
      var summary = $(".summary", live);
      if (summary && frac !== null) summary.setAttribute("data-progress", String(frac));
      // Screen readers hear the message at most every 5 s; the bar itself is always current.
      var pt = $("#progress-text");
      var t = Date.now();
      if (pt && e.message) {
        pt.setAttribute("aria-live", t - lastSpoken > 5000 ? "polite" : "off");
        if (t - lastSpoken > 5000) lastSpoken = t;
        pt.textContent = (e.stage ? e.stage + ": " : "") + e.message;
      }
      var pts = metricPoints(d.metrics);
      if (pts.length) { chart.add(pts); chart.draw(); }
      // A fine-tuning job's loss curve is drawn by the server: redraw it with the live panel, every 3 s at most.
      var m = d.metrics || {};
      if ((typeof m.loss === "number" || typeof m.eval_loss === "number") && $("#loss-curve") && t - lastCurve > 3000) {
        lastCurve = t;
        refreshLive();
      }
    }

    function handle(e) {
      if (typeof e.id === "number") { if (e.id <= lastId) return; lastId = e.id; }
      appendEvent(e);
      if (e.kind === "progress") onProgress(e);
      else if (e.kind === "stage" || e.kind === "status") {
        if (e.kind === "status" && e.data && e.data.status) status = e.data.status;
        refreshLive();
      }
    }

    if (terminal(status)) { setLiveState(""); return; }

    var polling = null;
    function poll() {
      fetch("/dashboard/jobs/" + jobId + "/events?after=" + lastId, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { if (r.status === 401) { window.location.href = "/dashboard/login"; throw new Error("signed out"); } return r.json(); })
        .then(function (page) {
          page.items.forEach(handle);
          if (terminal(page.job_status) && !page.items.length) { clearInterval(polling); refreshLive(); setLiveState("Job finished."); }
        })
        .catch(function () { setLiveState("Cannot reach the server; retrying…"); });
    }
    function startPolling() {
      if (polling) return;
      setLiveState("Following the job (polling every 2 s).");
      poll();
      polling = setInterval(poll, 2000);
    }
    if (!window.EventSource) { startPolling(); return; }
    var es = new EventSource("/dashboard/jobs/" + jobId + "/events?after=" + lastId);
    var failures = 0;
    setLiveState("Following the job live.");
    ["status", "stage", "progress", "log", "message"].forEach(function (kind) {
      es.addEventListener(kind, function (ev) { try { handle(JSON.parse(ev.data)); } catch (err) { /* keep-alives, bad data */ } });
    });
    es.addEventListener("end", function () { es.close(); refreshLive(); setLiveState("Job finished."); });
    es.addEventListener("open", function () { failures = 0; });
    es.addEventListener("error", function () {
      failures += 1;
      if (es.readyState === EventSource.CLOSED || failures >= 3) { es.close(); if (!terminal(status)) startPolling(); }
    });
  }

  // --- submit form --------------------------------------------------------------------------------

  function initSubmit() {
    var method = $("#method");
    if (!method) return;
    function sync() {
      $all("[data-for-method]").forEach(function (el) {
        var show = el.getAttribute("data-for-method").split(" ").indexOf(method.value) >= 0;
        el.hidden = !show;
      });
    }
    method.addEventListener("change", sync);
    sync();
    var errs = $("#form-errors");
    if (errs) errs.focus();
  }

  document.addEventListener("DOMContentLoaded", function () {
    initList();
    initJob();
    initSubmit();
    tick();
    setInterval(tick, 1000);
  });
})();
