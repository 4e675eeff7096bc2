// pgjobs dashboard: live updates over server-sent events, confirmations, CSRF for forms
// that arrived with a live update. No build step, no dependencies.
(function () {
  "use strict";
  const body = document.body;
  const base = body.dataset.base || "";
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";
  const FINAL = ["succeeded", "dead", "cancelled"];

  document.addEventListener("submit", function (event) {
    const form = event.target;
    const token = form.querySelector('input[name="csrf_token"]');
    if (token && !token.value) token.value = csrf;
    const question = form.dataset.confirm;
    if (question && !window.confirm(question)) event.preventDefault();
  });

  const status = document.getElementById("live-status");
  function setLive(state) {
    if (status) status.dataset.liveState = state;
  }

  function showStale() {
    const stale = document.getElementById("stale");
    if (stale) stale.hidden = false;
  }

  function showDeadAlert(data) {
    const box = document.getElementById("dead-alert");
    if (!box || !data.detail) return;
    box.textContent = "Dead-letter alert: queue " + data.queue + " has " + data.detail.dead +
      " dead jobs (threshold " + data.detail.threshold + ").";
    box.hidden = false;
  }

  function percent(progress) {
    const value = progress && typeof progress === "object" ? progress.value : progress;
    if (typeof value !== "number") return null;
    if (value >= 0 && value <= 1) return Math.round(value * 1000) / 10;
    if (value > 1 && value <= 100) return value;
    return null;
  }

  function setState(scope, state) {
    const badge = scope.querySelector('[data-field="state"]');
    if (!badge || !state) return;
    badge.textContent = state;
    badge.className = "state state-" + state;
  }

  function setProgress(scope, progress, data) {
    const bar = scope.querySelector('[data-field="progress"]');
    const pct = percent(progress);
    const row = scope.querySelector('[data-field="progress-row"]');
    if (row) row.hidden = false;
    if (bar && pct !== null) {
      bar.hidden = false;
      bar.value = pct;
    }
    const text = scope.querySelector('[data-field="progress-text"]');
    if (text) text.textContent = pct !== null ? pct + "%" : String(progress ?? "");
    const detail = scope.querySelector('[data-field="progress-data"]');
    if (detail && data !== undefined && data !== null) detail.textContent = JSON.stringify(data);
  }

  function setAttempts(scope, attempt, max) {
    const cell = scope.querySelector('[data-field="attempts"]');
    if (!cell || attempt === null || attempt === undefined) return;
    const parts = cell.textContent.split("/");
    cell.textContent = attempt + "/" + (max !== undefined ? max : parts[1] || "?");
  }

  function applyJobEvent(scope, event) {
    if (event.state) setState(scope, event.state);
    if (event.kind === "started") setAttempts(scope, event.attempt);
    if (event.kind === "progress") setProgress(scope, event.progress, event.progress_data);
  }

  function replace(id, html) {
    const target = document.getElementById(id);
    if (target) target.innerHTML = html;
  }

  function watchPage(view) {
    let url = base + "/events?view=" + encodeURIComponent(view);
    if (view === "jobs") {
      const ids = Array.from(document.querySelectorAll("[data-job-id]"), (row) => row.dataset.jobId);
      url += "&ids=" + ids.join(",");
    }
    const source = new EventSource(url);
    source.addEventListener("hello", () => setLive("on"));
    source.onerror = () => setLive("off");
    source.addEventListener("overview", (e) => replace("live-overview", e.data));
    source.addEventListener("workers", (e) => replace("live-workers", e.data));
    source.addEventListener("dead_alert", (e) => showDeadAlert(JSON.parse(e.data)));
    source.addEventListener("resync", showStale);
    source.addEventListener("job", function (e) {
      const event = JSON.parse(e.data);
      const row = document.querySelector('[data-job-id="' + event.id + '"]');
      if (row) applyJobEvent(row, event);
    });
  }

  function watchJob(id) {
    const shownFinal = FINAL.includes(body.dataset.state);
    const source = new EventSource(base + "/api/jobs/" + id + "/events");
    // A job that reached its final state is reloaded once, to show its result and errors.
    function finished(state) {
      if (!FINAL.includes(state)) return;
      source.close();
      setLive("off");
      if (!shownFinal) window.location.reload();
    }
    source.onopen = () => setLive("on");
    source.onerror = () => setLive("off");
    source.addEventListener("snapshot", function (e) {
      const job = JSON.parse(e.data);
      setState(body, job.state);
      setAttempts(body, job.attempts, job.max_attempts);
      if (job.progress) setProgress(body, job.progress, job.progress.data);
      finished(job.state);
    });
    source.addEventListener("job", function (e) {
      const event = JSON.parse(e.data);
      applyJobEvent(body, event);
      finished(event.state);
    });
    source.addEventListener("gone", () => source.close());
  }

  const live = body.dataset.live;
  if (!live || !window.EventSource) return;
  if (live === "job") watchJob(body.dataset.jobId);
  else watchPage(live);
})();
