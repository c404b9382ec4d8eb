// The play page: keys -> actions over one WebSocket, raw RGB frames back, drawn on a canvas.
// Protocol: see worldmodel/play/web.py. Frames: a 16-byte header (seq u32, frame index u32,
// height u16, width u16, model ms f32; little-endian) then height * width * 3 RGB bytes.
"use strict";

const HEADER_BYTES = 16;
const KEEP_LATENCIES = 20; // frames/s shown = 1000 / median of the last presses' latencies
const DIRECTIONS = {
  ArrowLeft: "left", KeyA: "left", ArrowRight: "right", KeyD: "right",
  ArrowUp: "up", KeyW: "up", ArrowDown: "down", KeyS: "down",
};
const MOVE_KEYS = {
  left: "← / A", right: "→ / D", up: "↑ / W", down: "↓ / S", noop: "space",
  "left+up": "← + ↑", "right+up": "→ + ↑", "left+down": "← + ↓", "right+down": "→ + ↓",
};
const PROCGEN_BUTTONS = [
  "LEFT+DOWN", "LEFT", "LEFT+UP", "DOWN", "none", "UP", "RIGHT+DOWN", "RIGHT", "RIGHT+UP",
  "D", "A", "W", "S", "Q", "E",
];

const $ = (id) => document.getElementById(id);
const screen = $("screen");
const ctx = screen.getContext("2d");

const state = {
  socket: null,
  info: null,
  seq: 0,
  sent: new Map(), // seq -> performance.now() of the key press it answers
  inflight: null, // seq of the step awaiting its frame: one step at a time, the newest key next
  queued: null, // {action, time, label}: the latest key pressed while a step was in flight
  held: [], // directions held, oldest first
  latencies: [],
  frames: 0,
};

// ------------------------------------------------------------------------------------ socket
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const socket = new WebSocket(`${scheme}://${location.host}/ws`);
  socket.binaryType = "arraybuffer";
  socket.onopen = () => setStatus("connected");
  socket.onmessage = (event) => {
    if (typeof event.data === "string") onMessage(JSON.parse(event.data));
    else onFrame(event.data);
  };
  socket.onclose = (event) => {
    const why = event.code === 1009 ? ": the message was too big for the server" : "";
    showError(`the connection closed (code ${event.code})${why}; reconnecting (a new session)…`);
    state.inflight = null;
    setTimeout(connect, 1000);
  };
  state.socket = socket;
  window.play.socket = socket;
}

function send(command) {
  if (!state.socket || state.socket.readyState !== WebSocket.OPEN) {
    showError("not connected to the server");
    return null;
  }
  command.seq = ++state.seq;
  state.socket.send(JSON.stringify(command));
  return command.seq;
}

function onMessage(message) {
  if (message.type === "error") {
    showError(message.message);
    if (message.seq === state.inflight) stepDone();
    return;
  }
  if (message.type === "info") {
    state.info = message;
    showInfo(message);
  }
}

function onFrame(buffer) {
  const view = new DataView(buffer);
  const seq = view.getUint32(0, true);
  const index = view.getUint32(4, true);
  const height = view.getUint16(8, true);
  const width = view.getUint16(10, true);
  const modelMs = view.getFloat32(12, true);
  const rgb = new Uint8Array(buffer, HEADER_BYTES);
  if (screen.width !== width || screen.height !== height) {
    screen.width = width;
    screen.height = height;
  }
  const image = ctx.createImageData(width, height);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    image.data[j] = rgb[i];
    image.data[j + 1] = rgb[i + 1];
    image.data[j + 2] = rgb[i + 2];
    image.data[j + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
  state.frames += 1;
  screen.dataset.frames = String(state.frames);
  $("frame-index").textContent = String(index);
  if (modelMs > 0) $("model-ms").textContent = modelMs.toFixed(0);
  const pressed = state.sent.get(seq);
  if (pressed !== undefined) {
    state.sent.delete(seq);
    // drawn: the next animation frame shows the canvas as it is now
    requestAnimationFrame(() => recordLatency(performance.now() - pressed));
  }
  if (seq === state.inflight) stepDone();
}

function recordLatency(ms) {
  state.latencies.push(ms);
  if (state.latencies.length > KEEP_LATENCIES) state.latencies.shift();
  const sorted = [...state.latencies].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  $("latency").textContent = median.toFixed(0);
  $("fps").textContent = (1000 / median).toFixed(1);
  $("fps").dataset.fps = String(1000 / median);
}

// ------------------------------------------------------------------------------------ play
function press(action, label, time) {
  if (state.inflight !== null) {
    state.queued = { action, label, time };
    return;
  }
  hideError();
  highlight(label);
  const seq = send({ type: "step", action });
  if (seq !== null) {
    state.inflight = seq;
    state.sent.set(seq, time);
  }
}

function stepDone() {
  state.inflight = null;
  const next = state.queued;
  state.queued = null;
  if (next) press(next.action, next.label, next.time);
}

function currentMove() {
  const last = (names) => [...state.held].reverse().find((d) => names.includes(d));
  const horizontal = last(["left", "right"]);
  const vertical = last(["up", "down"]);
  return horizontal && vertical ? `${horizontal}+${vertical}` : horizontal || vertical;
}

function pressMove(move, fallback, time) {
  const moves = state.info ? state.info.moves : {};
  const name = move in moves ? move : fallback;
  if (!(name in moves)) {
    showError(`this world has no key mapping for ${name}: use the digits (model actions)`);
    return;
  }
  press(moves[name].model, name, time);
}

function reset(prompt) {
  state.queued = null;
  state.inflight = null;
  send(prompt === undefined ? { type: "reset" } : { type: "reset", prompt });
}

document.addEventListener("keydown", (event) => {
  if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
  const time = performance.now();
  const direction = DIRECTIONS[event.code];
  if (direction) {
    event.preventDefault();
    state.held = state.held.filter((d) => d !== direction).concat([direction]);
    pressMove(currentMove(), direction, time);
  } else if (event.code === "Space") {
    event.preventDefault();
    pressMove("noop", "noop", time);
  } else if (/^Digit\d$/.test(event.code)) {
    const action = Number(event.code.slice(5));
    if (state.info && action < state.info.num_actions) press(action, `digit${action}`, time);
    else showError(`action ${action} is outside this world's ${state.info ? state.info.num_actions : "?"} actions`);
  } else if (event.code === "KeyR") {
    reset();
  }
});

document.addEventListener("keyup", (event) => {
  const direction = DIRECTIONS[event.code];
  if (direction) state.held = state.held.filter((d) => d !== direction);
});
window.addEventListener("blur", () => { state.held = []; });

// ------------------------------------------------------------------------------------ page
function showInfo(info) {
  setStatus(`${info.world}: ${info.num_actions} ${info.action_source} actions`);
  const choice = $("world-choice");
  choice.replaceChildren(...info.worlds.map((name) => new Option(name, name, false, name === info.world)));
  const legend = $("legend");
  legend.replaceChildren();
  for (const [move, action] of Object.entries(info.moves)) {
    const row = legend.insertRow();
    row.dataset.move = move;
    const button = PROCGEN_BUTTONS[action.true] ? ` ${PROCGEN_BUTTONS[action.true]}` : "";
    row.insertCell().innerHTML = `<kbd>${MOVE_KEYS[move] || move}</kbd>`;
    row.insertCell().textContent = move;
    row.insertCell().textContent = `true ${action.true}${button} → model ${action.model}`;
  }
  const digits = $("digits");
  digits.replaceChildren();
  const label = document.createElement("span");
  label.className = "hint";
  label.textContent = `${info.action_source} actions (keys 0–${Math.min(info.num_actions, 10) - 1}):`;
  digits.append(label);
  for (let a = 0; a < info.num_actions; a++) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = String(a);
    button.dataset.action = String(a);
    button.onclick = () => press(a, `digit${a}`, performance.now());
    digits.append(button);
  }
  const prompts = $("prompts");
  if (prompts.dataset.world !== info.world) {
    prompts.dataset.world = info.world;
    prompts.replaceChildren();
    for (let i = 0; i < info.prompts; i++) {
      const img = document.createElement("img");
      img.src = `/worlds/${encodeURIComponent(info.world)}/prompts/${i}.png`;
      img.alt = img.title = `test frame ${i}`;
      img.onclick = () => reset(i);
      prompts.append(img);
    }
  }
  [...prompts.children].forEach((img, i) => img.classList.toggle("selected", i === info.prompt));
  $("steps").value = String(info.steps);
  $("temperature").value = String(info.temperature);
  $("temperature-value").textContent = info.temperature.toFixed(1);
  $("gif").href = `/session/${info.session}/play.gif`;
  $("mp4").href = `/session/${info.session}/play.mp4`;
}

function highlight(label) {
  for (const row of $("legend").rows) row.classList.toggle("active", row.dataset.move === label);
  for (const b of $("digits").querySelectorAll("button")) {
    b.classList.toggle("active", `digit${b.dataset.action}` === label);
  }
}

function setStatus(text) { $("status").textContent = text; }
function showError(text) { $("error").textContent = text; $("error").hidden = false; }
function hideError() { $("error").hidden = true; }

function upload(file) {
  if (!file) return;
  const limit = state.info ? 2 * state.info.max_upload_bytes : Infinity;
  if (file.size > limit) {
    showError(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB: too big to send`);
    return;
  }
  hideError();
  file.arrayBuffer().then((bytes) => {
    state.queued = null;
    state.inflight = null;
    state.socket.send(bytes);
  });
}

// after a control changes, the keys go back to the game
$("world-choice").onchange = (event) => {
  setStatus(`loading ${event.target.value}…`);
  send({ type: "world", name: event.target.value });
  event.target.blur();
};
$("steps").onchange = (event) => {
  send({ type: "configure", steps: Number(event.target.value) });
  event.target.blur();
};
$("temperature").oninput = (event) => { $("temperature-value").textContent = Number(event.target.value).toFixed(1); };
$("temperature").onchange = (event) => {
  send({ type: "configure", temperature: Number(event.target.value) });
  event.target.blur();
};
$("reset").onclick = () => reset();
$("file").onchange = (event) => { upload(event.target.files[0]); event.target.value = ""; };
const drop = $("drop");
document.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
document.addEventListener("dragleave", () => drop.classList.remove("over"));
document.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  upload(event.dataTransfer.files[0]);
});

// what the page measured, for a reader of the page (and the bench): latencies in ms, frames drawn
window.play = {
  socket: null,
  stats: () => ({ latencies: [...state.latencies], frames: state.frames, fps: Number($("fps").dataset.fps) }),
};
connect();
