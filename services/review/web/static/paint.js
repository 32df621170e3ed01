// Brush and eraser on a case's masks (1024x1024 0/1 per mask). Strokes are kept as data (mask, mode,
// radius, points) so unfinished work survives a reload by replaying them; a painted mask goes back to
// the server as np.packbits of its pixels, base64.
"use strict";

const MedgatePaint = (() => {
  const MIN_RADIUS = 1, MAX_RADIUS = 128;

  // Set (1) or clear (0) a disc; returns the touched rectangle [x0, y0, x1, y1] (exclusive).
  function stamp(bits, size, cx, cy, r, value) {
    const x0 = Math.max(0, Math.floor(cx - r)), x1 = Math.min(size, Math.ceil(cx + r) + 1);
    const y0 = Math.max(0, Math.floor(cy - r)), y1 = Math.min(size, Math.ceil(cy + r) + 1);
    const r2 = r * r;
    for (let y = y0; y < y1; y++) {
      const dy = y + 0.5 - cy;
      for (let x = x0; x < x1; x++) {
        const dx = x + 0.5 - cx;
        if (dx * dx + dy * dy <= r2) bits[y * size + x] = value;
      }
    }
    return [x0, y0, x1, y1];
  }

  // A segment of a stroke, stamped every half radius; returns the touched rectangle.
  function segment(bits, size, a, b, r, value) {
    const steps = Math.max(1, Math.ceil(Math.hypot(b[0] - a[0], b[1] - a[1]) / Math.max(r / 2, 0.5)));
    let rect = [size, size, 0, 0];
    for (let i = 0; i <= steps; i++) {
      const t = i / steps;
      const s = stamp(bits, size, a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, r, value);
      rect = [Math.min(rect[0], s[0]), Math.min(rect[1], s[1]), Math.max(rect[2], s[2]), Math.max(rect[3], s[3])];
    }
    return rect;
  }

  function replay(bits, size, stroke) {
    const value = stroke.erase ? 0 : 1, pts = stroke.points;
    for (let i = 0; i < pts.length; i++) segment(bits, size, pts[Math.max(0, i - 1)], pts[i], stroke.r, value);
  }

  // np.packbits (most significant bit first) of 0/1 bytes, as base64.
  function packBase64(bits) {
    const packed = new Uint8Array(Math.ceil(bits.length / 8));
    for (let i = 0; i < bits.length; i++) if (bits[i]) packed[i >> 3] |= 0x80 >> (i & 7);
    let text = "";
    for (let i = 0; i < packed.length; i += 0x8000) text += String.fromCharCode(...packed.subarray(i, i + 0x8000));
    return btoa(text);
  }

  // Redraw part of a mask's tinted canvas from its bits.
  function tint(canvas, bits, size, color, rect) {
    const [x0, y0, x1, y1] = rect || [0, 0, size, size];
    if (x1 <= x0 || y1 <= y0) return;
    const g = canvas.getContext("2d");
    const data = g.createImageData(x1 - x0, y1 - y0);
    const out = new Uint32Array(data.data.buffer);
    const [r, gg, b] = [1, 3, 5].map((i) => parseInt(color.slice(i, i + 2), 16));
    const on = (0xff << 24) | (b << 16) | (gg << 8) | r; // little-endian RGBA
    for (let y = y0, q = 0; y < y1; y++) for (let x = x0; x < x1; x++, q++) out[q] = bits[y * size + x] ? on : 0;
    g.putImageData(data, x0, y0);
  }

  const clampRadius = (r) => Math.min(MAX_RADIUS, Math.max(MIN_RADIUS, r));

  return { stamp, segment, replay, packBase64, tint, clampRadius };
})();
