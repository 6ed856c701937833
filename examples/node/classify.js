#!/usr/bin/env node
/* Classify image files with an edgexfer end-to-end model in Node.js (onnxruntime-node), printing one
 * JSON line per image, as `edgexfer predict` does:
 *
 *   node classify.js runs/demo/model.int8.e2e.onnx photo.jpg [more.png ...] [--top-k 3]
 *
 * (A plain model.onnx is taken to mean the model.e2e.onnx beside it.) The model does the resizing,
 * cropping and normalisation itself; this script only decodes the image (jpeg-js, pngjs: pure
 * JavaScript) and hands the pixels over as uint8 [H, W, C]. */
"use strict";
const fs = require("fs");
const path = require("path");
const ort = require("onnxruntime-node");
const jpeg = require("jpeg-js");
const { PNG } = require("pngjs");
const { edgexferModel, topK } = require("../web/onnx-meta.js");

/* JSON as Python's json.dumps writes it (", " and ": " separators), so the lines equal `edgexfer predict`'s. */
function pyFloat(x) {  // Python's repr(float): shortest digits, exponent form below 1e-4 and from 1e16
  if (!Number.isFinite(x)) return "null";
  const [m, e] = x.toExponential().split("e");
  const exp = parseInt(e, 10), neg = m.startsWith("-"), digits = m.replace("-", "").replace(".", "");
  let out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) out = "0." + "0".repeat(-exp - 1) + digits;
    else {
      const d = digits.padEnd(exp + 1, "0");
      out = d.slice(0, exp + 1) + "." + (d.slice(exp + 1) || "0");
    }
  } else out = digits[0] + (digits.length > 1 ? "." + digits.slice(1) : "") + "e" + (exp < 0 ? "-" : "+") +
    String(Math.abs(exp)).padStart(2, "0");
  return (neg ? "-" : "") + out;
}

function pyJSON(v, isFloat = false) {
  if (Array.isArray(v)) return "[" + v.map((x) => pyJSON(x)).join(", ") + "]";
  if (v !== null && typeof v === "object")
    return "{" + Object.entries(v).map(([k, x]) => pyJSON(k) + ": " + pyJSON(x, k === "score")).join(", ") + "}";
  if (isFloat && typeof v === "number") return pyFloat(v);
  return JSON.stringify(v).replace(/[\u0080-\uffff]/g, (c) => "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"));
}

function fail(msg) {
  process.stderr.write(`error: ${msg}\n`);
  process.exit(2);
}

/* An image file -> {data: Uint8Array, dims: [H, W, C]} (C = 4 for PNG's RGBA, 3 for JPEG's RGB). */
function decode(file) {
  const buf = fs.readFileSync(file);
  if (buf.length >= 8 && buf.readUInt32BE(0) === 0x89504e47) {
    const png = PNG.sync.read(buf);                  // 8-bit RGBA, palettes and grey expanded
    return { data: new Uint8Array(png.data.buffer, png.data.byteOffset, png.data.length), dims: [png.height, png.width, 4] };
  }
  if (buf.length >= 2 && buf[0] === 0xff && buf[1] === 0xd8) {
    const img = jpeg.decode(buf, { useTArray: true, formatAsRGBA: false, maxMemoryUsageInMB: 1024 });
    return { data: img.data, dims: [img.height, img.width, img.data.length / (img.height * img.width)] };
  }
  throw new Error(`cannot decode image ${file}: only PNG and JPEG here`);
}

async function main(argv) {
  let topk = 3;
  const args = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--top-k") {
      topk = parseInt(argv[++i], 10);
      if (!(topk >= 1)) fail("--top-k takes a positive integer");
    } else args.push(argv[i]);
  }
  if (args.length < 2) fail("usage: node classify.js MODEL.e2e.onnx IMAGE [IMAGE ...] [--top-k K]");
  let modelPath = args[0];
  if (!modelPath.endsWith(".e2e.onnx") && modelPath.endsWith(".onnx")) modelPath = modelPath.slice(0, -5) + ".e2e.onnx";
  if (!fs.existsSync(modelPath)) fail(`model not found: ${modelPath}`);
  const bytes = fs.readFileSync(modelPath);
  let model;
  try {
    model = edgexferModel(bytes);
  } catch (e) {
    fail(`${modelPath}: ${e.message}`);
  }
  const session = await ort.InferenceSession.create(bytes);
  for (const file of args.slice(1)) {
    let img;
    try {
      img = decode(file);
    } catch (e) {
      fail(e.message);
    }
    const out = await session.run({ image: new ort.Tensor("uint8", img.data, img.dims) },
                                  model.tasks.map((t) => t.probabilities));
    const per = model.tasks.map((t) => [t.name, topK(out[t.probabilities].data, t.labels, topk)]);
    const predictions = per.length === 1 ? per[0][1] : Object.fromEntries(per);
    process.stdout.write(pyJSON({ image: file, predictions }) + "\n");
  }
}

main(process.argv.slice(2)).catch((e) => fail(e.message.split("\n")[0]));
