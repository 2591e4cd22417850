// Microphone samples at the context's rate in; 16 kHz mono int16 frames of 100 ms out.
// Downsampling: a moving average as long as the rate ratio (a cheap low-pass against aliasing),
// then linear interpolation at 16 kHz positions, carried across render blocks.
const TARGET_RATE = 16000;
const FRAME = 1600;

class PcmWorklet extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / TARGET_RATE;
    this.taps = Math.max(1, Math.round(this.step));
    this.window = new Float32Array(this.taps);
    this.windowAt = 0;
    this.windowSum = 0;
    this.filtered = [];
    this.position = 0;
    this.frame = new Int16Array(FRAME);
    this.filled = 0;
    this.levelSum = 0;
    this.levelCount = 0;
    this.port.onmessage = (event) => {
      if (event.data === "flush") {
        this.port.postMessage({ type: "audio", data: this.frame.slice(0, this.filled).buffer, last: true });
        this.filled = 0;
      }
    };
  }

  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true;
    for (const sample of channel) {
      this.windowSum += sample - this.window[this.windowAt];
      this.window[this.windowAt] = sample;
      this.windowAt = (this.windowAt + 1) % this.taps;
      this.filtered.push(this.windowSum / this.taps);
      this.levelSum += sample * sample;
      this.levelCount += 1;
    }
    while (this.position + 1 < this.filtered.length) {
      const index = Math.floor(this.position);
      const fraction = this.position - index;
      const value = this.filtered[index] * (1 - fraction) + this.filtered[index + 1] * fraction;
      this.frame[this.filled++] = Math.max(-32768, Math.min(32767, Math.round(value * 32767)));
      if (this.filled === FRAME) {
        this.port.postMessage({ type: "audio", data: this.frame.slice().buffer });
        this.filled = 0;
      }
      this.position += this.step;
    }
    const consumed = Math.floor(this.position);
    this.filtered.splice(0, consumed);
    this.position -= consumed;
    if (this.levelCount >= sampleRate / 20) {
      this.port.postMessage({ type: "level", rms: Math.sqrt(this.levelSum / this.levelCount) });
      this.levelSum = 0;
      this.levelCount = 0;
    }
    return true;
  }
}

registerProcessor("pcm-worklet", PcmWorklet);
