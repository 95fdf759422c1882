// shoal: keeps an environment's page live. The page is complete without
// this script; with it, each server-sent event (the environment's JSON
// record) makes the page fetch a fresh copy of its live section, and the
// loading estimate is worked out from the rate the bytes really arrive at.
"use strict";
(function () {
  var live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  var samples = []; // [time ms, bytes_done] while loading
  var busy = false, again = false;

  function estimate(rec) {
    var l = rec.load || {};
    if (rec.status !== "loading" || !l.bytes_needed) { samples = []; return null; }
    samples.push([Date.now(), l.bytes_done]);
    if (samples.length > 20) samples.shift();
    if (samples.length < 2) return null;
    var a = samples[0], b = samples[samples.length - 1];
    var rate = (b[1] - a[1]) / Math.max(1, b[0] - a[0]); // bytes per ms
    if (rate <= 0) return null;
    var secs = Math.ceil((l.bytes_needed - l.bytes_done) / rate / 1000);
    var pct = Math.floor(l.bytes_done * 100 / l.bytes_needed);
    return pct + "% · about " + (secs >= 60 ? Math.ceil(secs / 60) + " min" : secs + " s") + " left";
  }

  function refresh(eta) {
    if (busy) { again = true; return; }
    busy = true;
    fetch(live.getAttribute("data-live"), { cache: "no-store" })
      .then(function (r) { return r.text(); })
      .then(function (html) {
        live.innerHTML = html;
        var e = live.querySelector("[data-eta]");
        if (e && eta) e.textContent = eta;
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; refresh(eta); } });
  }

  var es = new EventSource(live.getAttribute("data-events"));
  function onEvent(ev) {
    var rec;
    try { rec = JSON.parse(ev.data); } catch (e) { return; }
    refresh(estimate(rec));
    if (rec.status === "deleted" || rec.status === "lost") es.close();
  }
  ["pending", "loading", "starting", "ready", "failed", "deleted", "lost"].forEach(function (t) {
    es.addEventListener(t, onEvent);
  });
  var polling = null;
  es.onerror = function () {
    // The stream ends when the environment is gone; the browser retries
    // otherwise, which is what we want. A stream refused outright (closed:
    // e.g. 401 without a token) leaves the page to poll its live section.
    if (es.readyState === EventSource.CLOSED && !polling) {
      polling = setInterval(function () {
        if (live.querySelector('[data-status="deleted"],[data-status="lost"],[data-status="failed"]')) { clearInterval(polling); return; }
        refresh(null);
      }, 2000);
    }
  };
})();
