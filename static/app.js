// The page: microphone -> AudioWorklet (16 kHz int16) -> /ws; partials and finals -> the transcript.
const $ = (id) => document.getElementById(id);
const KEY = "stt-api-key";

const state = {
  ws: null,
  retries: 0,
  health: null,
  recording: false,
  starting: false, // between a press and the microphone being open
  capture: null, // {stream, context, node, stopped}
  awaitingFinal: false, // from the config of an utterance to its final
  stopSentAt: 0,
  heldSpace: false,
};

// Close codes the server uses, in words for people.
const CLOSE_WORDS = {
  1008: "the server refused this page",
  1009: "the utterance was too long; stop sooner",
  1011: "the server failed; it may work again after a retry",
  1013: "the server is busy; retrying",
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

// "Systran/faster-whisper-tiny.en" as it is; a local path by its last two folders, not a bare "model".
function modelName(model) {
  return String(model || "model").replace(/\/+$/, "").split("/").slice(-2).join("/");
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
    if (state.ws !== ws) return;
    state.retries = 0;
    setStatus(`connected · ${modelName(state.health.model)} on ${state.health.device}`, "connected");
    $("talk").disabled = false;
  };
  ws.onmessage = (event) => {
    if (state.ws === ws) onMessage(JSON.parse(event.data));
  };
  ws.onclose = (event) => {
    if (state.ws !== ws) return; // an older socket, already replaced
    state.ws = null;
    $("talk").disabled = true;
    const interrupted = state.recording || state.starting || state.awaitingFinal;
    if (state.capture) stopCapture(false);
    state.recording = false;
    state.awaitingFinal = false;
    setTalking(false);
    if (event.code === 1008) {
      // Refused (API key or origin): retrying the same way cannot help.
      showError(event.reason || CLOSE_WORDS[1008]);
      setStatus("not connected", "closed");
      if (/API key|token|unauthori/i.test(event.reason)) askForKey();
      return;
    }
    if (CLOSE_WORDS[event.code]) showError(event.reason ? `${CLOSE_WORDS[event.code]} (${event.reason})` : CLOSE_WORDS[event.code]);
    else if (interrupted) showError("the connection was lost during the utterance; it was not transcribed");
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
    if (!state.awaitingFinal) return; // a late partial must not bring back a finished utterance
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
    if (typeof message.duration_s === "number") {
      const duration = document.createElement("span");
      duration.className = "duration";
      const language = message.language ? `, ${message.language}` : "";
      duration.textContent = `${message.duration_s.toFixed(1)} s of audio${language}`;
      item.append(duration);
    }
    state.awaitingFinal = false;
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
  if (state.recording || state.starting || state.capture || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  state.recording = true;
  state.starting = true;
  setTalking(true);
  showError("");
  $("committed").textContent = "";
  $("tentative").textContent = "";
  $("recorded").textContent = "0.0 s";
  try {
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
    const context = new AudioContext();
    await context.audioWorklet.addModule("/static/pcm-worklet.js");
    const node = new AudioWorkletNode(context, "pcm-worklet");
    const capture = { stream, context, node, stopped: false, samples: 0 };
    node.port.onmessage = (event) => onWorklet(event.data, capture);
    // A silent sink keeps the graph pulling samples without playing the microphone back.
    const mute = context.createGain();
    mute.gain.value = 0;
    context.createMediaStreamSource(stream).connect(node).connect(mute).connect(context.destination);
    state.starting = false;
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      teardown(capture); // the socket went away while the microphone opened
      return;
    }
    state.capture = capture;
    state.ws.send(JSON.stringify(config()));
    state.awaitingFinal = true;
    if (!state.recording) stopCapture(true); // released before the microphone opened
  } catch (error) {
    state.starting = false;
    state.recording = false;
    setTalking(false);
    showError(`microphone unavailable: ${error.message}`);
  }
}

function onWorklet(message, capture) {
  if (message.type === "level") {
    // -60 dBFS (quiet room) .. 0 dBFS (full scale) on the meter.
    const db = 20 * Math.log10(Math.max(message.rms, 1e-6));
    $("level").value = Math.min(1, Math.max(0, (db + 60) / 60));
    return;
  }
  if (capture.stopped && !message.last) return;
  if (state.ws && state.ws.readyState === WebSocket.OPEN && message.data.byteLength) {
    state.ws.send(message.data);
    // What the server has been sent, in seconds of 16 kHz int16: it shows a stalled microphone.
    capture.samples += message.data.byteLength / 2;
    $("recorded").textContent = `${(capture.samples / 16000).toFixed(1)} s`;
  }
  if (message.last) sendStop(capture);
}

function stop() {
  if (!state.recording) return;
  if (state.starting) {
    state.recording = false; // start() sends the stop once the microphone is open
    setTalking(false);
    return;
  }
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

// Space belongs to the focused control (typing, choosing, pressing another button), not to push-to-talk.
function typing(event) {
  return event.target instanceof Element && event.target.closest("input, select, textarea, a[href], button:not(#talk)");
}

$("talk").addEventListener("click", () => (state.recording ? stop() : start()));
document.addEventListener("keydown", (event) => {
  if (event.code !== "Space" || typing(event)) return;
  event.preventDefault(); // no scrolling, and no button click on release
  if (event.repeat || state.heldSpace) return;
  state.heldSpace = true;
  start();
});
document.addEventListener("keyup", (event) => {
  if (event.code !== "Space" || !state.heldSpace) return;
  event.preventDefault();
  state.heldSpace = false;
  stop();
});
// Leaving the window while holding space never delivers the keyup: treat it as a release.
window.addEventListener("blur", () => {
  if (!state.heldSpace) return;
  state.heldSpace = false;
  stop();
});
$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value);
  $("key-form").hidden = true;
  showError("");
  const old = state.ws;
  state.ws = null; // its close must not schedule a reconnect of its own
  if (old) old.close();
  connect();
});

connect();
