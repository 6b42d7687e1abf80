// The Train tab: start training jobs through the admin API, list them, and follow one live.
//
// A job's live view is fed by GET /admin/jobs/{id}/events, read with fetch() because it needs the admin
// token in a header. The stream first replays everything the job has logged, so opening a job that is half
// done (or finished) draws its whole curve, then continues live until the final `status` event.

import { ADMIN_TOKEN, ApiError, api, describe, fmt, readSSE, request, store } from "./api.js";
import { LossChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
const LIVE = new Set(["queued", "running"]);
const RESUMABLE = new Set(["interrupted", "cancelled"]);
const POLL_MS = 3000;

// An integer field's value; undefined when empty; the raw text when it is not a number (the server's 422
// then names the field).
function intField(input) {
  if (input.validity && input.validity.badInput) return input.value || "not a number";
  const text = input.value.trim();
  if (text === "") return undefined;
  const n = Number(text);
  return Number.isInteger(n) ? n : text;
}

function message(box, text, kind = "") {
  box.textContent = text;
  box.hidden = !text;
  box.classList.toggle("error", kind === "error");
  box.classList.toggle("ok", kind === "ok");
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });

export function initTrain({ isVisible, onModelChange }) {
  const tokenInput = $("admin-token");
  const authMsg = $("train-auth-msg");
  const jobForm = $("job-form");
  const jobFormMsg = $("job-form-msg");
  const jobStart = $("job-start");
  const list = $("job-list");
  const listEmpty = $("job-list-empty");
  const datasetSelect = $("data-dataset");
  const detail = $("job-detail");
  const d = {
    title: $("job-title"), status: $("job-status"), progress: $("job-progress"), progressLabel: $("job-progress-label"),
    eta: $("job-eta"), trainLoss: $("job-train-loss"), valLoss: $("job-val-loss"), tps: $("job-tps"),
    sample: $("job-sample"), error: $("job-error"), msg: $("job-msg"),
    plan: $("job-plan"), planRows: $("job-plan-rows"),
    serve: $("job-serve-now"), cancel: $("job-cancel"), resume: $("job-resume"),
  };
  const chart = new LossChart($("loss-chart"));

  let token = store.get(ADMIN_TOKEN);
  let jobs = [];
  let selected = null; // the selected job's view (object from the API)
  let follow = null; // AbortController of the event stream being read
  let autoSelected = false;

  tokenInput.value = token;

  // -- token ----------------------------------------------------------------------------------------------
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    token = tokenInput.value.trim();
    store.set(ADMIN_TOKEN, token);
    if (await refreshAll() && token) message(authMsg, "Token accepted.", "ok");
    onModelChange(); // the model panel shows the size on disk only with a working admin token
  });
  $("admin-token-forget").addEventListener("click", () => {
    token = "";
    tokenInput.value = "";
    store.set(ADMIN_TOKEN, "");
    stopFollowing();
    jobs = [];
    selected = null;
    detail.hidden = true;
    renderJobs();
    message(authMsg, "Token forgotten.");
    onModelChange();
  });

  // -- data source ----------------------------------------------------------------------------------------
  for (const radio of jobForm.elements.source) radio.addEventListener("change", showSourceField);
  function showSourceField() {
    const source = jobForm.elements.source.value;
    for (const field of jobForm.querySelectorAll("[data-source]")) field.hidden = field.dataset.source !== source;
  }
  showSourceField();

  async function refreshDatasets() {
    if (!token) return;
    try {
      const { data } = await api("/admin/datasets", { token });
      const keep = datasetSelect.value;
      datasetSelect.replaceChildren(
        ...data.map((ds) => new Option(`${ds.filename} (${fmt.bytes(ds.bytes)}, ${fmt.time(ds.created_at)})`, ds.id)),
      );
      if (data.length === 0) datasetSelect.append(new Option("No uploads yet", ""));
      if (keep) datasetSelect.value = keep;
    } catch {
      /* refreshJobs reports auth problems; an empty list is fine here */
    }
  }

  // -- starting a job -------------------------------------------------------------------------------------
  jobForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    message(jobFormMsg, "");
    if (!token) {
      message(jobFormMsg, "Enter the admin token first.", "error");
      tokenInput.focus();
      return;
    }
    jobStart.disabled = true;
    try {
      const data = await dataSource();
      const job = await api("/admin/jobs", { method: "POST", token, json: jobBody(data) });
      message(jobFormMsg, `Started job ${job.name || job.id}.`, "ok");
      jobs = [job, ...jobs.filter((j) => j.id !== job.id)];
      renderJobs();
      select(job);
    } catch (err) {
      message(jobFormMsg, describe(err), "error");
    } finally {
      jobStart.disabled = false;
    }
  });

  // The `data` of the job request; uploads the chosen file first when that is the source.
  async function dataSource() {
    const source = jobForm.elements.source.value;
    if (source === "stdlib") return "stdlib";
    if (source === "upload") {
      const file = $("data-file").files[0];
      if (!file) throw new Error("Choose a file to upload.");
      message(jobFormMsg, `Uploading ${file.name} (${fmt.bytes(file.size)})…`);
      const form = new FormData();
      form.append("file", file);
      const ds = await api("/admin/datasets", { method: "POST", token, body: form });
      refreshDatasets();
      return ds.id;
    }
    if (source === "dataset") {
      if (!datasetSelect.value) throw new Error("Choose an uploaded dataset (or upload one).");
      return datasetSelect.value;
    }
    const path = $("data-path").value.trim();
    if (!path) throw new Error("Enter a path under the server's data directory.");
    return path;
  }

  function jobBody(data) {
    const steps = intField($("job-steps"));
    const n = Number.isInteger(steps) ? steps : null;
    // The budget is wall time for the whole job; without a step count the learning rate follows it, and
    // with the `auto` model the trainer plans the model for it (its plan arrives as a `plan` record).
    const body = { data, max_time: Number($("job-budget").value), max_steps: steps };
    const preset = $("job-preset").value;
    if (preset !== "auto") body.preset = preset;
    // Defaults scaled to the run's length, so a short run from the page still gets a curve: the trainer's
    // own defaults (evaluate every 200 steps, log every 10, warm up for 100) suit long runs.
    body.eval_every = intField($("job-eval-every")) ?? (n ? Math.min(200, Math.max(1, Math.round(n / 10))) : undefined);
    if (n) {
      body.log_every = Math.min(10, Math.max(1, Math.ceil(n / 200)));
      body.warmup_steps = Math.min(100, Math.floor(n / 10));
    }
    body.batch_size = intField($("job-batch"));
    const block = intField($("job-block"));
    if (block !== undefined) body.model = { block_size: block };
    const name = $("job-name").value.trim();
    if (name) body.name = name;
    body.serve_when_done = $("job-serve").checked;
    return body;
  }

  // -- the job list ---------------------------------------------------------------------------------------
  $("jobs-refresh").addEventListener("click", () => refreshAll());

  // Reload jobs and datasets; false (with the reason shown) when the admin API refused.
  async function refreshAll() {
    const ok = await refreshJobs();
    if (ok) await refreshDatasets();
    return ok;
  }

  async function refreshJobs() {
    if (!token) {
      message(authMsg, "Enter the admin token to start and watch training jobs.");
      return false;
    }
    try {
      const { data } = await api("/admin/jobs?limit=50", { token });
      jobs = data;
      if (!authMsg.classList.contains("ok")) message(authMsg, ""); // clear a past refusal, keep "accepted"
    } catch (err) {
      message(authMsg, describe(err), "error");
      return false;
    }
    renderJobs();
    const current = selected && jobs.find((j) => j.id === selected.id);
    if (current) renderDetail(current);
    if (!selected && !autoSelected) {
      autoSelected = true; // once per page: open a running job so its curve shows without a click
      const live = jobs.find((j) => LIVE.has(j.status));
      if (live) select(live);
    }
    return true;
  }

  function progressText(job) {
    const step = job.step ?? 0;
    return job.total_steps ? `step ${step} / ${job.total_steps}` : `step ${step}`;
  }

  // Update the list in place, keyed by job id: rebuilding it would drop keyboard focus every poll.
  function renderJobs() {
    listEmpty.hidden = jobs.length > 0;
    const items = new Map([...list.children].map((li) => [li.dataset.jobId, li]));
    jobs.forEach((job, i) => {
      let li = items.get(job.id);
      if (!li) {
        li = document.createElement("li");
        li.dataset.jobId = job.id;
        const button = document.createElement("button");
        button.type = "button";
        button.innerHTML = '<span class="job-name"></span><span class="badge"></span><span class="job-meta"></span>';
        button.addEventListener("click", () => select(jobs.find((j) => j.id === job.id) || job));
        li.append(button);
      }
      items.delete(job.id);
      const button = li.firstElementChild;
      button.setAttribute("aria-pressed", String(selected !== null && selected.id === job.id));
      button.querySelector(".job-name").textContent = job.name || job.id;
      const badge = button.querySelector(".badge");
      badge.textContent = job.status;
      badge.dataset.status = job.status;
      const preset = (job.request && job.request.preset) || "";
      button.querySelector(".job-meta").textContent =
        [job.name ? job.id : "", preset, progressText(job), fmt.time(job.created_at)].filter(Boolean).join(" · ");
      if (list.children[i] !== li) list.insertBefore(li, list.children[i] || null);
    });
    for (const li of items.values()) li.remove();
  }

  // -- the selected job -----------------------------------------------------------------------------------
  function select(job) {
    const same = selected && selected.id === job.id;
    selected = job;
    for (const button of list.querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.parentElement.dataset.jobId === job.id));
    }
    detail.hidden = false;
    message(d.msg, "");
    renderDetail(job);
    if (!same || !follow) startFollowing(job.id);
  }

  function renderDetail(job) {
    // The list poll can lag the event stream by a moment: never move a live job's progress backwards.
    if (selected && selected.id === job.id && LIVE.has(job.status) && (selected.step ?? 0) > (job.step ?? 0)) {
      job = { ...job, step: selected.step };
    }
    selected = { ...selected, ...job };
    detail.dataset.status = job.status;
    d.title.textContent = job.name ? `${job.name} (${job.id})` : job.id;
    d.status.textContent = job.status;
    d.status.dataset.status = job.status;
    setProgress(job.step, job.total_steps);
    d.eta.textContent = job.status === "running" ? fmt.duration(job.eta_s) : job.status === "succeeded" ? "done" : "—";
    d.trainLoss.textContent = fmt.loss(job.train_loss);
    d.valLoss.textContent = fmt.loss(job.val_loss);
    d.tps.textContent = job.tokens_per_s ? fmt.count(Math.round(job.tokens_per_s)) : "—";
    const problems = [job.error, job.serve_error && `Serving failed: ${job.serve_error}`].filter(Boolean);
    message(d.error, problems.join(" "), "error");
    const checkpoints = job.checkpoints || {};
    d.serve.disabled = !(checkpoints.best || checkpoints.last);
    d.serve.title = d.serve.disabled ? "This job has no checkpoint yet" : `Serve ${checkpoints.best || checkpoints.last}`;
    d.cancel.hidden = !LIVE.has(job.status);
    d.resume.hidden = !RESUMABLE.has(job.status);
  }

  function setProgress(step, total) {
    d.progress.max = total || 1;
    d.progress.value = Math.min(step || 0, total || 1);
    const pct = total ? ` (${Math.floor((100 * (step || 0)) / total)}%)` : "";
    d.progressLabel.textContent = `${progressText({ step, total_steps: total })}${pct}`;
  }

  // One metrics record of the job (see training/metrics.py RECORD_FIELDS for the fields of each type).
  function onRecord(type, rec) {
    switch (type) {
      case "start":
        chart.setTotalSteps(rec.total_steps);
        if (rec.resumed_from_step != null) chart.truncateAfter(rec.resumed_from_step);
        selected.total_steps = rec.total_steps;
        setProgress(selected.step, rec.total_steps);
        break;
      case "train":
        chart.addTrain(rec.step, rec.loss);
        selected.step = rec.step;
        setProgress(rec.step, rec.total_steps);
        d.eta.textContent = fmt.duration(rec.eta_s);
        d.trainLoss.textContent = fmt.loss(rec.loss);
        d.tps.textContent = rec.tokens_per_s ? fmt.count(Math.round(rec.tokens_per_s)) : "—";
        break;
      case "eval":
        chart.addVal(rec.step, rec.val_loss);
        d.valLoss.textContent = fmt.loss(rec.val_loss);
        if (rec.sample) {
          d.sample.textContent = `Sample at step ${rec.step}: ${rec.sample}`;
          d.sample.hidden = false;
        }
        break;
      case "checkpoint":
        d.serve.disabled = false; // something to load now, even mid-run
        break;
      case "plan":
        showPlan(rec.rows || []);
        break;
      case "error":
        message(d.error, rec.message, "error");
        break;
      default:
        break; // `end` and `sft_eval`: the final `status` event carries what the page shows
    }
  }

  // The planner's table: each setting, its value and why (training/planner.py).
  function showPlan(rows) {
    d.planRows.replaceChildren(
      ...rows.map((row) => {
        const tr = document.createElement("tr");
        for (const value of [row.name, String(row.value), row.why]) {
          const td = document.createElement("td");
          td.textContent = value;
          tr.append(td);
        }
        return tr;
      }),
    );
    d.plan.hidden = rows.length === 0;
  }

  function stopFollowing() {
    if (follow) follow.abort();
    follow = null;
  }

  // Follow the job's event stream until its `status` event. A dropped connection (server restart, proxy
  // timeout) is retried with Last-Event-ID, so the server skips the records this page already has.
  function startFollowing(jobId) {
    stopFollowing();
    chart.clear();
    chart.setTotalSteps(selected.total_steps);
    d.sample.hidden = true;
    d.plan.hidden = true;
    const controller = (follow = new AbortController());
    const { signal } = controller;
    let lastId = "";
    (async () => {
      for (let attempt = 0; !signal.aborted; attempt++) {
        let finished = false;
        try {
          const headers = lastId ? { "Last-Event-ID": lastId } : {};
          const response = await request(`/admin/jobs/${encodeURIComponent(jobId)}/events`, { token, signal, headers });
          attempt = 0;
          await readSSE(response, (event) => {
            if (signal.aborted) return;
            if (event.id) lastId = event.id;
            const data = JSON.parse(event.data);
            if (event.event === "status") {
              finished = true;
              renderDetail(data);
              refreshJobs();
              if (data.served_checkpoint) onModelChange();
            } else {
              onRecord(event.event, data);
            }
          });
        } catch (err) {
          if (signal.aborted) return;
          // A refusal (bad token, unknown job) will not change by retrying.
          if (err instanceof ApiError && err.status < 500) {
            message(d.error, describe(err), "error");
            break;
          }
        }
        if (finished) break;
        await sleep(Math.min(10000, 500 * 2 ** attempt), signal);
      }
      if (follow === controller) follow = null;
    })();
  }

  d.serve.addEventListener("click", async () => {
    if (!selected) return;
    d.serve.disabled = true;
    message(d.msg, "Loading the checkpoint…");
    try {
      // A job id names its best checkpoint (or its last when it has no best yet).
      const res = await api("/admin/model", { method: "POST", token, json: { checkpoint: selected.id } });
      message(d.msg, `Now serving ${res.checkpoint}.`, "ok");
      onModelChange();
    } catch (err) {
      message(d.msg, describe(err), "error");
    } finally {
      d.serve.disabled = false;
    }
  });

  d.cancel.addEventListener("click", async () => {
    if (!selected) return;
    try {
      renderDetail(await api(`/admin/jobs/${encodeURIComponent(selected.id)}/cancel`, { method: "POST", token }));
      message(d.msg, "Cancelling: the job saves a checkpoint, then stops.");
      refreshJobs();
    } catch (err) {
      message(d.msg, describe(err), "error");
    }
  });

  d.resume.addEventListener("click", async () => {
    if (!selected) return;
    try {
      const job = await api(`/admin/jobs/${encodeURIComponent(selected.id)}/resume`, { method: "POST", token });
      renderDetail(job);
      message(d.msg, "Resumed from the last checkpoint.", "ok");
      startFollowing(job.id);
      refreshJobs();
    } catch (err) {
      message(d.msg, describe(err), "error");
    }
  });

  // Poll the list while the tab is on screen: job status changes (queued -> running -> succeeded) are not
  // pushed for jobs other than the one being followed.
  setInterval(() => {
    if (token && isVisible() && document.visibilityState === "visible") refreshJobs();
  }, POLL_MS);

  return {
    // Called when the tab is shown.
    show() {
      if (token) refreshAll();
      else message(authMsg, "Enter the admin token to start and watch training jobs.");
    },
    token: () => token,
  };
}
