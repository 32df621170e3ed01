// Window/level on a case's original values: the 16-bit modality image of a grey DICOM case (decoded here,
// since a canvas reads every PNG as 8 bits), else the 8-bit model image. Presets per modality, as in OHIF.
"use strict";

const MedgateImage = (() => {
  // CT presets (width, level in HU); key 5 is the file's own window.
  const CT_PRESETS = [
    ["soft tissue", 400, 40], ["lung", 1500, -600], ["bone", 1800, 400], ["brain", 80, 40],
  ];

  // A 16-bit greyscale, non-interlaced PNG (what the gateway writes) -> Uint16Array of its samples.
  async function decodePng16(buffer) {
    const bytes = new Uint8Array(buffer), view = new DataView(buffer);
    const signature = [137, 80, 78, 71, 13, 10, 26, 10];
    if (signature.some((b, i) => bytes[i] !== b)) throw new Error("not a PNG");
    let pos = 8, width = 0, height = 0, depth = 0, colour = -1, interlace = 0;
    const idat = [];
    while (pos + 8 <= bytes.length) {
      const length = view.getUint32(pos);
      const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
      if (type === "IHDR") {
        width = view.getUint32(pos + 8); height = view.getUint32(pos + 12);
        depth = bytes[pos + 16]; colour = bytes[pos + 17]; interlace = bytes[pos + 20];
      } else if (type === "IDAT") idat.push(bytes.subarray(pos + 8, pos + 8 + length));
      else if (type === "IEND") break;
      pos += 12 + length;
    }
    if (depth !== 16 || colour !== 0 || interlace !== 0) throw new Error("not a 16-bit grey PNG");
    const inflated = new Blob(idat).stream().pipeThrough(new DecompressionStream("deflate"));
    const raw = new Uint8Array(await new Response(inflated).arrayBuffer());
    const stride = width * 2;
    if (raw.length < height * (stride + 1)) throw new Error("truncated PNG");
    const values = new Uint16Array(width * height);
    let prev = new Uint8Array(stride), cur = new Uint8Array(stride);
    for (let y = 0; y < height; y++) {
      const start = y * (stride + 1), filter = raw[start];
      for (let i = 0; i < stride; i++) {
        const a = i >= 2 ? cur[i - 2] : 0, b = prev[i], c = i >= 2 ? prev[i - 2] : 0;
        let v = raw[start + 1 + i];
        if (filter === 1) v += a;
        else if (filter === 2) v += b;
        else if (filter === 3) v += (a + b) >> 1;
        else if (filter === 4) {
          const p = a + b - c, pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
          v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
        }
        cur[i] = v & 255;
      }
      for (let x = 0; x < width; x++) values[y * width + x] = (cur[2 * x] << 8) | cur[2 * x + 1];
      [prev, cur] = [cur, prev];
    }
    return { width, height, values };
  }

  // The content of the letterboxed square (the rest is padding, painted black).
  function contentRect(kase, size) {
    const t = kase.transform || {};
    if (!t.originalWidth || !t.originalHeight) return [0, 0, size, size];
    const w = Math.round(t.originalWidth * (t.scaleX || t.scale)), h = Math.round(t.originalHeight * (t.scaleY || t.scale));
    return [t.padLeft || 0, t.padTop || 0, Math.min(size, w), Math.min(size, h)];
  }

  // The values a case is windowed on: {values, offset, scale, min, max, bits, unit, modality, window, invert}.
  function fromModality(meta, decoded) {
    return {
      values: decoded.values, offset: meta.offset, scale: meta.scale, min: meta.min, max: meta.max, bits: 16,
      modality: meta.modality || "", unit: meta.modality === "CT" ? "HU" : "",
      window: meta.window && meta.window.width > 0 ? meta.window : null, invert: !!meta.invert,
    };
  }

  function from8bit(imageData) {
    const values = new Uint8Array(imageData.width * imageData.height);
    for (let p = 0, q = 0; q < values.length; p += 4, q++) values[q] = imageData.data[p];
    return { values, offset: 0, scale: 1, min: 0, max: 255, bits: 8, modality: "", unit: "", window: null, invert: false };
  }

  // 0.5 and 99.5 percentiles of the content, from a histogram of the stored values.
  function autoWindow(img, rect, size) {
    const bins = new Uint32Array(img.bits === 16 ? 65536 : 256);
    const [x0, y0, w, h] = rect;
    for (let y = y0; y < y0 + h; y++) for (let x = x0; x < x0 + w; x++) bins[img.values[y * size + x]]++;
    const total = w * h, find = (share) => {
      let seen = 0;
      for (let s = 0; s < bins.length; s++) { seen += bins[s]; if (seen >= share * total) return s; }
      return bins.length - 1;
    };
    const low = img.offset + find(0.005) * img.scale, high = img.offset + find(0.995) * img.scale;
    return { width: Math.max(high - low, img.scale), level: (low + high) / 2 };
  }

  // Presets for keys 1-5: [{name, width, level}].
  function presets(img, rect, size) {
    const full = { name: "full range", width: Math.max(img.max - img.min, 1), level: (img.max + img.min) / 2 };
    if (img.bits === 8) return [{ name: "full range (8-bit)", width: 255, level: 127.5 }];
    const own = img.window ? {
      name: img.window.source === "dicom" ? "the file's window" : `the gateway's window (${img.window.source})`,
      width: img.window.width, level: img.window.center,
    } : null;
    if (img.modality === "CT") {
      return [...CT_PRESETS.map(([name, width, level]) => ({ name, width, level })), own || full];
    }
    const auto = { name: "auto (0.5-99.5 %)", ...autoWindow(img, rect, size) };
    return own ? [own, full, auto] : [full, auto];
  }

  function defaultWindow(img, rect, size) {
    const first = presets(img, rect, size)[0];
    return { width: first.width, level: first.level, invert: img.invert, preset: first.name };
  }

  // Window ``img`` into ``canvas`` (size x size); padding outside ``rect`` stays black.
  function render(img, wl, canvas, rect, size) {
    const count = img.bits === 16 ? 65536 : 256;
    const lut = new Uint32Array(count);
    const low = wl.level - wl.width / 2, width = Math.max(wl.width, 1e-6);
    for (let s = 0; s < count; s++) {
      let g = Math.round(((img.offset + s * img.scale - low) / width) * 255);
      g = g < 0 ? 0 : g > 255 ? 255 : g;
      if (wl.invert) g = 255 - g;
      lut[s] = 0xff000000 | (g << 16) | (g << 8) | g;
    }
    const out = new ImageData(size, size);
    const out32 = new Uint32Array(out.data.buffer);
    out32.fill(0xff000000);
    const [x0, y0, w, h] = rect, values = img.values;
    for (let y = y0; y < y0 + h; y++) {
      const row = y * size;
      for (let x = x0; x < x0 + w; x++) out32[row + x] = lut[values[row + x]];
    }
    canvas.width = size; canvas.height = size;
    canvas.getContext("2d").putImageData(out, 0, 0);
  }

  // Drag sensitivity: value units per screen pixel.
  const step = (img) => Math.max((img.max - img.min) / 1024, img.bits === 8 ? 1 : img.scale);

  return { decodePng16, contentRect, fromModality, from8bit, presets, defaultWindow, render, step };
})();
