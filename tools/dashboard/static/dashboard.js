// steerl operator console: one WebSocket for state and frames, fetch() for the buttons.
"use strict";

const params = new URLSearchParams(window.location.search);
let token = params.get("token") || "";
const $ = (id) => document.getElementById(id);

// Frame-to-screen latencies (ms) of the frames drawn, for benchmarks and tests.
window.steerlStats = { frames: 0, latenciesMs: [], states: 0, lastState: null };

function headers() {
  const result = { "Content-Type": "application/json" };
  if (token) result["X-Steerl-Token"] = token;
  return result;
}

function showMessage(text, kind) {
  const box = $("message");
  box.textContent = text;
  box.className = "message " + (kind || "info");
  clearTimeout(showMessage.timer);
  showMessage.timer = setTimeout(() => box.classList.add("hidden"), kind === "error" ? 8000 : 3000);
}

async function api(path, body) {
  const options = body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, options);
  let payload = {};
  try { payload = await response.json(); } catch (error) { payload = { error: response.statusText }; }
  if (response.status === 401) askForToken();
  if (!response.ok) throw new Error(payload.error || response.statusText);
  return payload;
}

function askForToken() {
  const given = window.prompt("This console needs its token:");
  if (given) {
    token = given;
    connect();
  }
}

// --- buttons ---------------------------------------------------------------------------------
async function sendEvent(event) {
  try {
    const result = await api("api/command", { event: event });
    const robot = result.robot ? (result.robot.held ? "; robot held" : "; robot: " + result.robot.error) : "";
    showMessage(event + ": " + result.actor + robot, "info");
  } catch (error) {
    showMessage(event + " refused: " + error.message, "error");
  }
}

for (const button of document.querySelectorAll("button[data-event]")) {
  button.addEventListener("click", () => sendEvent(button.dataset.event));
}

$("start-form").addEventListener("submit", async (submitted) => {
  submitted.preventDefault();
  try {
    await api("api/session/start", { config: $("config-select").value, steps: parseInt($("steps-input").value, 10) });
    showMessage("session started", "info");
  } catch (error) { showMessage("start refused: " + error.message, "error"); }
});

$("stop-session").addEventListener("click", async () => {
  try {
    const result = await api("api/session/stop", {});
    showMessage("stopping after this episode (" + result.via + ")", "info");
  } catch (error) { showMessage("stop refused: " + error.message, "error"); }
});

async function loadCheckpoints() {
  try {
    const result = await api("api/checkpoints");
    const body = $("checkpoints").querySelector("tbody");
    body.replaceChildren();
    for (const entry of result.checkpoints) {
      const row = document.createElement("tr");
      for (const value of [entry.run, entry.name, entry.updates ?? "-", entry.transitions ?? "-"]) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.appendChild(cell);
      }
      const action = document.createElement("td");
      const button = document.createElement("button");
      button.textContent = "Evaluate";
      button.className = "small";
      button.addEventListener("click", () => evaluate(entry.path));
      action.appendChild(button);
      row.appendChild(action);
      body.appendChild(row);
    }
  } catch (error) { showMessage("checkpoints: " + error.message, "error"); }
}

async function evaluate(path) {
  try {
    await api("api/evaluate", { config: $("config-select").value, checkpoint: path,
                               episodes: parseInt($("eval-episodes").value, 10) });
    showMessage("evaluating " + path, "info");
  } catch (error) { showMessage("evaluation refused: " + error.message, "error"); }
}

$("refresh-checkpoints").addEventListener("click", loadCheckpoints);

async function loadConfigs() {
  try {
    const result = await api("api/configs");
    const select = $("config-select");
    select.replaceChildren();
    for (const name of result.configs) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name.split("/").pop().replace(/\.yaml$/, "");
      option.title = name;
      select.appendChild(option);
    }
  } catch (error) { showMessage("configs: " + error.message, "error"); }
}

// --- frames ----------------------------------------------------------------------------------
const cameraImages = {};

function cameraImage(name) {
  if (!cameraImages[name]) {
    $("no-cameras").classList.add("hidden");
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.id = "camera-" + name;
    image.alt = name + " camera";
    image.dataset.sequence = "0";
    const caption = document.createElement("figcaption");
    caption.textContent = name;
    figure.append(image, caption);
    $("camera-views").appendChild(figure);
    cameraImages[name] = image;
  }
  return cameraImages[name];
}

async function showFrame(data) {
  const view = new DataView(data);
  const headerLength = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(data, 4, headerLength)));
  const blob = new Blob([new Uint8Array(data, 4 + headerLength)], { type: "image/jpeg" });
  const image = cameraImage(header.camera);
  const url = URL.createObjectURL(blob);
  const previous = image.src;
  image.src = url;
  try { await image.decode(); } catch (error) { return; }
  if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
  image.dataset.sequence = String(header.sequence);
  requestAnimationFrame(() => {
    const stats = window.steerlStats;
    stats.frames += 1;
    stats.latenciesMs.push(Date.now() - header.observed_unix_s * 1000);
    if (stats.latenciesMs.length > 10000) stats.latenciesMs.shift();
  });
}

// --- state -----------------------------------------------------------------------------------
const fixed = (value, digits) => (value === null || value === undefined ? "-" : Number(value).toFixed(digits));
const percent = (value) => (value === null || value === undefined ? "-" : Math.round(value * 100) + " %");

function setBadge(element, text, kind) {
  element.textContent = text;
  element.className = "badge " + kind;
}

function showState(state) {
  window.steerlStats.states += 1;
  window.steerlStats.lastState = state;
  const actor = state.actor || {};
  setBadge($("connection"), state.live ? "actor live" : "no actor", state.live ? "on" : "off");
  const operatorState = actor.operator_state || "-";
  setBadge($("operator-state"), operatorState.toUpperCase(), operatorState === "running" ? "on" : "alert");
  document.body.classList.toggle("stopped", operatorState === "e-stopped");
  $("pause").textContent = operatorState === "paused" ? "Continue" : "Pause";
  $("intervening").classList.toggle("hidden", !actor.intervened);
  $("session-name").textContent = actor.config_name ? actor.config_name + " (" + actor.mode + ", " + actor.actor_id + ")" : "-";
  $("episode").textContent = actor.episode ?? "-";
  $("episode-step").textContent = actor.episode_step ?? "-";
  $("episode-return").textContent = fixed(actor.episode_return, 2);
  $("action").textContent = actor.action && actor.action.length ? actor.action.map((v) => v.toFixed(2)).join(" ") : "-";
  $("env-steps").textContent = actor.env_steps === undefined ? "-" : actor.env_steps + (actor.total_steps ? " / " + actor.total_steps : "");
  $("policy").textContent = actor.policy_name ? actor.policy_name : (actor.policy_version === undefined ? "-" : "v" + actor.policy_version);
  $("steps-per-s").textContent = fixed(actor.steps_per_s, 0);
  $("learner-link").textContent = actor.learner_connected === undefined ? "-" : (actor.learner_connected ? "connected" : "away");
  $("learner-updates").textContent = actor.learner_updates ?? "-";
  $("updates-per-s").textContent = fixed(state.learner_updates_per_s, 1);
  $("link-latency").textContent = actor.link_latency_ms === null || actor.link_latency_ms === undefined ? "-" : fixed(actor.link_latency_ms, 1) + " ms";
  $("success-rate").textContent = percent(actor.success_rate);
  $("intervention-rate").textContent = percent(actor.intervention_rate);
  $("eval-success").textContent = percent(actor.eval_success_rate);
  const robot = actor.robot || {};
  const stopped = robot.emergency_stopped === 1;
  $("robot-estop").textContent = robot.emergency_stopped === undefined ? "-" : (stopped ? "STOPPED (arm held)" : "clear");
  $("robot-estop").className = stopped ? "alert-text" : "";
  $("robot-watchdog").textContent = robot.watchdog_trips ?? "-";
  $("robot-clipped").textContent = robot.clipped_steps ?? "-";
  $("robot-refused").textContent = robot.refused_actions ?? "-";
  $("robot-missed").textContent = robot.missed_ticks ?? "-";
  $("robot-camera-faults").textContent = robot.camera_faults ?? "-";
  drawPlots(state.episodes || []);
  showSession(state);
}

function showSession(state) {
  const session = state.session;
  $("session-log").textContent = session ? (session.running ? "running: " : "ended (" + session.exit_code + "): ")
    + session.config + " -> " + session.run_dir + "\n" + session.log_tail.split("\n").slice(-6).join("\n") : "";
  const list = $("evaluations");
  list.replaceChildren();
  for (const job of state.evaluations || []) {
    const item = document.createElement("li");
    const outcome = job.result ? "success " + percent(job.result.success_rate) + " over " + job.result.episodes + " episodes"
      : (job.running ? "running" : "failed (exit " + job.exit_code + ")");
    item.textContent = job.checkpoint + ": " + outcome;
    list.appendChild(item);
  }
}

function drawSeries(canvasId, points, low, high, colour) {
  const canvas = $(canvasId);
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  context.strokeStyle = "#ccc";
  context.strokeRect(0.5, 0.5, canvas.width - 1, canvas.height - 1);
  if (points.length === 0) return;
  const xs = points.map((p) => p[0]);
  const xMin = Math.min(...xs), xMax = Math.max(...xs, xMin + 1);
  const ys = points.map((p) => p[1]);
  const yMin = low ?? Math.min(...ys), yMax = Math.max(high ?? Math.max(...ys), yMin + 1e-6);
  const x = (value) => 4 + (value - xMin) / (xMax - xMin) * (canvas.width - 8);
  const y = (value) => canvas.height - 4 - (value - yMin) / (yMax - yMin) * (canvas.height - 8);
  context.strokeStyle = colour;
  context.lineWidth = 1.5;
  context.beginPath();
  points.forEach((p, i) => (i ? context.lineTo(x(p[0]), y(p[1])) : context.moveTo(x(p[0]), y(p[1]))));
  context.stroke();
  context.fillStyle = "#555";
  context.font = "10px sans-serif";
  context.fillText(yMax.toFixed(2), 6, 12);
  context.fillText(yMin.toFixed(2), 6, canvas.height - 6);
  context.fillText(String(xMax), canvas.width - 50, canvas.height - 6);
}

function rolling(values, window) {
  return values.map((_, i) => {
    const slice = values.slice(Math.max(0, i - window + 1), i + 1);
    return slice.reduce((a, b) => a + b, 0) / slice.length;
  });
}

function drawPlots(episodes) {
  const training = episodes.filter((e) => !e.evaluation && !e.discarded);
  const steps = training.map((e) => e.env_steps);
  drawSeries("plot-return", training.map((e, i) => [steps[i], e.episode_return]), null, null, "#1f6feb");
  const success = rolling(training.map((e) => (e.success ? 1 : 0)), 20);
  drawSeries("plot-success", success.map((v, i) => [steps[i], v]), 0, 1, "#2da44e");
  drawSeries("plot-intervention", training.map((e, i) => [steps[i], e.intervention_rate]), 0, 1, "#bf8700");
}

// --- the stream ------------------------------------------------------------------------------
let socket = null;

function connect() {
  if (socket) { socket.onclose = null; socket.close(); }
  const scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
  const base = window.location.pathname.replace(/[^/]*$/, "");
  socket = new WebSocket(scheme + window.location.host + base + "ws" + (token ? "?token=" + encodeURIComponent(token) : ""));
  socket.binaryType = "arraybuffer";
  socket.onmessage = (message) => {
    if (typeof message.data === "string") showState(JSON.parse(message.data));
    else showFrame(message.data);
  };
  socket.onclose = (closed) => {
    setBadge($("connection"), "console offline", "off");
    if (closed.code === 4401) { askForToken(); return; }
    setTimeout(connect, 1000);
  };
  loadConfigs();
  loadCheckpoints();
}

connect();
