// Microphone samples at the context's rate in; 16 kHz mono int16 frames of 100 ms out.
//
// Resampling for any input rate: every 16 kHz output sample is a windowed-sinc (Blackman)
// interpolation of the input around its exact position, so one kernel both low-passes below the
// lower Nyquist frequency (no aliasing when downsampling 48 kHz, no images when upsampling 8 kHz)
// and interpolates at fractional positions. The kernel is tabulated once and read with linear
// interpolation. Passband to 0.875 x the lower Nyquist, stopband from the Nyquist itself.
const TARGET_RATE = 16000;
const FRAME = 1600; // 100 ms
const TABLE_STEPS = 64; // kernel table entries per input sample

class PcmWorklet extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE; // input samples per output sample
    const band = Math.min(sampleRate, TARGET_RATE) / 2; // Hz kept
    const cutoff = (0.875 * band) / sampleRate; // cycles per input sample, at the middle of the transition
    // Blackman's transition is about 5.5 / length: span the 0.25 x band from passband to stopband.
    this.half = Math.ceil((11 * sampleRate) / band); // kernel half-length, input samples
    this.table = new Float32Array(this.half * TABLE_STEPS + 2);
    for (let i = 0; i <= this.half * TABLE_STEPS; i++) {
      const t = i / TABLE_STEPS;
      const x = 2 * cutoff * t;
      const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
      const w = 0.42 + 0.5 * Math.cos((Math.PI * t) / this.half) + 0.08 * Math.cos((2 * Math.PI * t) / this.half);
      this.table[i] = 2 * cutoff * sinc * w;
    }
    this.buffer = new Float32Array(8192);
    this.count = 0; // samples held in buffer
    this.position = 0; // where the next output sample falls, in buffer indices (fractional)
    this.frame = new Int16Array(FRAME);
    this.filled = 0;
    this.levelSum = 0;
    this.levelCount = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") this.flush();
    };
  }

  kernel(offset) {
    const at = Math.abs(offset) * TABLE_STEPS;
    const i = at | 0;
    const fraction = at - i;
    return this.table[i] * (1 - fraction) + this.table[i + 1] * fraction;
  }

  append(samples) {
    if (this.count + samples.length > this.buffer.length) {
      const bigger = new Float32Array(Math.max(this.buffer.length * 2, this.count + samples.length));
      bigger.set(this.buffer.subarray(0, this.count));
      this.buffer = bigger;
    }
    this.buffer.set(samples, this.count);
    this.count += samples.length;
  }

  // Emits every output sample whose kernel window the buffer covers (and that falls before end),
  // then drops input no later output needs.
  resample(end = Infinity) {
    const { buffer, half } = this;
    while (this.position + half < this.count && this.position < end) {
      const first = Math.max(0, Math.ceil(this.position - half));
      const last = Math.floor(this.position + half);
      let sum = 0;
      for (let i = first; i <= last; i++) sum += buffer[i] * this.kernel(i - this.position);
      this.frame[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(sum * 32767)));
      if (this.filled === FRAME) {
        this.port.postMessage({ type: "audio", data: this.frame.slice().buffer });
        this.filled = 0;
      }
      this.position += this.step;
    }
    const drop = Math.max(0, Math.floor(this.position - half) - 1);
    if (drop > 0) {
      buffer.copyWithin(0, drop, this.count);
      this.count -= drop;
      this.position -= drop;
    }
  }

  // The end of an utterance: silence past the last sample lets the tail out, then the short frame goes.
  flush() {
    const end = this.count;
    this.append(new Float32Array(this.half + 1));
    this.resample(end);
    this.port.postMessage({ type: "audio", data: this.frame.slice(0, this.filled).buffer, last: true });
    this.filled = 0;
    this.count = 0;
    this.position = 0;
  }

  process(inputs) {
    const channels = inputs[0];
    if (!channels || channels.length === 0) return true;
    let mono = channels[0];
    if (channels.length > 1) {
      mono = new Float32Array(mono.length);
      for (const channel of channels) for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / channels.length;
    }
    for (const sample of mono) this.levelSum += sample * sample;
    this.levelCount += mono.length;
    this.append(mono);
    this.resample();
    if (this.levelCount >= sampleRate / 20) {
      this.port.postMessage({ type: "level", rms: Math.sqrt(this.levelSum / this.levelCount) });
      this.levelSum = 0;
      this.levelCount = 0;
    }
    return true;
  }
}

registerProcessor("pcm-worklet", PcmWorklet);
