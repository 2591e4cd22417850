// The page: microphone -> AudioWorklet (16 kHz int16) -> /ws; partials and finals -> the transcript.
const $ = (id) => document.getElementById(id);
const KEY = "stt-api-key";

const state = {
  ws: null,
  retries: 0,
  health: null,
  recording: false,
  capture: null, // {stream, context, node, stopped}
  stopSentAt: 0,
};

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
}

function showError(text) {
  $("error").textContent = text;
}

function setTalking(talking) {
  $("talk").textContent = talking ? "Stop" : "Start";
  $("talk").setAttribute("aria-pressed", String(talking));
}

async function loadHealth() {
  const response = await fetch("/health", { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(`server ${body.status || response.status}`);
  return body;
}

function showSettings(health) {
  const select = $("language");
  const chosen = select.value;
  select.replaceChildren(new Option("auto-detect", "auto"));
  for (const code of health.languages) select.add(new Option(code, code));
  select.value = health.languages.includes(chosen) ? chosen : health.languages.length === 1 ? health.languages[0] : "auto";
  const translate = $("task").querySelector('option[value="translate"]');
  translate.disabled = !health.can_translate;
  translate.textContent = health.can_translate ? "translate to English" : "translate (this model cannot)";
  if (!health.can_translate) $("task").value = "transcribe";
}

function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const key = sessionStorage.getItem(KEY);
  return `${scheme}//${location.host}/ws${key ? `?token=${encodeURIComponent(key)}` : ""}`;
}

async function connect() {
  setStatus("connecting…", "connecting");
  try {
    state.health = await loadHealth();
    showSettings(state.health);
  } catch (error) {
    scheduleReconnect(`server unreachable (${error.message})`);
    return;
  }
  const ws = new WebSocket(socketUrl());
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => {
    state.retries = 0;
    setStatus(`connected · ${state.health.model.split("/").pop()} on ${state.health.device}`, "connected");
    $("talk").disabled = false;
  };
  ws.onmessage = (event) => onMessage(JSON.parse(event.data));
  ws.onclose = (event) => {
    state.ws = null;
    $("talk").disabled = true;
    if (state.recording) stopCapture(false);
    if (event.code === 1008) {
      // Refused (API key or origin): retrying the same way cannot help.
      showError(event.reason || "the server refused this page");
      setStatus("not connected", "closed");
      if (/API key/i.test(event.reason)) askForKey();
      return;
    }
    if (event.code === 1009 || event.code === 1011) showError(event.reason || `connection closed (${event.code})`);
    scheduleReconnect(event.reason || "connection lost");
  };
}

function scheduleReconnect(why) {
  const delay = Math.min(10, 0.5 * 2 ** state.retries++);
  setStatus(`reconnecting in ${delay.toFixed(1)} s: ${why}`, "reconnecting");
  setTimeout(connect, delay * 1000);
}

function askForKey() {
  $("key-form").hidden = false;
  $("key").focus();
}

function onMessage(message) {
  if (message.type === "partial") {
    const hasSplit = typeof message.committed === "string";
    $("committed").textContent = hasSplit ? message.committed : "";
    $("tentative").textContent = hasSplit ? message.tentative : message.text;
  } else if (message.type === "final") {
    const item = document.createElement("li");
    const text = document.createElement("span");
    text.className = "final";
    text.textContent = message.text || "(nothing heard)";
    const latency = document.createElement("span");
    latency.className = "latency";
    latency.textContent = `final in ${Math.round(performance.now() - state.stopSentAt)} ms`;
    item.append(text, latency);
    $("history").prepend(item);
    $("committed").textContent = "";
    $("tentative").textContent = "";
  } else if (message.type === "error") {
    showError(message.message);
  }
}

function config() {
  const language = $("language").value;
  const beam = Math.min(10, Math.max(1, Number.parseInt($("beam").value, 10) || 1));
  $("beam").value = beam;
  return { language: language === "auto" ? null : language, task: $("task").value, beam_size: beam };
}

async function start() {
  if (state.recording || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  state.recording = true;
  setTalking(true);
  showError("");
  $("committed").textContent = "";
  $("tentative").textContent = "";
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const context = new AudioContext();
    await context.audioWorklet.addModule("/static/pcm-worklet.js");
    const node = new AudioWorkletNode(context, "pcm-worklet");
    const capture = { stream, context, node, stopped: false };
    node.port.onmessage = (event) => onWorklet(event.data, capture);
    // A silent sink keeps the graph pulling samples without playing the microphone back.
    const mute = context.createGain();
    mute.gain.value = 0;
    context.createMediaStreamSource(stream).connect(node).connect(mute).connect(context.destination);
    state.capture = capture;
    state.ws.send(JSON.stringify(config()));
    if (!state.recording) stopCapture(true); // released before the microphone opened
  } catch (error) {
    state.recording = false;
    setTalking(false);
    showError(`microphone unavailable: ${error.message}`);
  }
}

function onWorklet(message, capture) {
  if (message.type === "level") {
    $("level").value = Math.min(1, message.rms * 4);
    return;
  }
  if (capture.stopped && !message.last) return;
  if (state.ws && state.ws.readyState === WebSocket.OPEN && message.data.byteLength) state.ws.send(message.data);
  if (message.last) sendStop(capture);
}

function stop() {
  if (!state.recording) return;
  state.recording = false;
  setTalking(false);
  if (state.capture) stopCapture(true);
}

function stopCapture(sendFinal) {
  const capture = state.capture;
  state.capture = null;
  state.recording = false;
  setTalking(false);
  if (!capture) return;
  capture.stopped = true;
  if (!sendFinal) return teardown(capture);
  // The worklet hands over the samples it still holds, then the stop goes out: nothing is lost.
  capture.node.port.postMessage("flush");
  capture.flushTimer = setTimeout(() => sendStop(capture), 500);
}

function sendStop(capture) {
  if (capture.stopSent) return;
  capture.stopSent = true;
  clearTimeout(capture.flushTimer);
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ type: "stop" }));
    state.stopSentAt = performance.now();
  }
  teardown(capture);
}

function teardown(capture) {
  for (const track of capture.stream.getTracks()) track.stop();
  capture.context.close();
  $("level").value = 0;
}

function typing(event) {
  return event.target instanceof Element && event.target.closest("input, select, textarea");
}

$("talk").addEventListener("click", () => (state.recording ? stop() : start()));
document.addEventListener("keydown", (event) => {
  if (event.code !== "Space" || typing(event)) return;
  event.preventDefault(); // no scrolling, and no button click on release
  if (!event.repeat) start();
});
document.addEventListener("keyup", (event) => {
  if (event.code !== "Space" || typing(event)) return;
  event.preventDefault();
  stop();
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key-form").hidden = true;
  showError("");
  connect();
});

connect();
