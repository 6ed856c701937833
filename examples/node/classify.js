#!/usr/bin/env node
/* Classify image files with an edgexfer end-to-end model in Node.js (onnxruntime-node), printing one
 * JSON line per image, as `edgexfer predict` does:
 *
 *   node classify.js runs/demo/model.int8.e2e.onnx photo.jpg [more.png ...] [--top-k 3]
 *
 * (A plain model.onnx is taken to mean the model.e2e.onnx beside it.) The model does the resizing,
 * cropping and normalisation itself; this script only decodes the image and hands the pixels over as
 * uint8 [H, W, C]. It decodes with sharp (libvips and libjpeg-turbo, prebuilt for Linux, macOS and
 * Windows on x64 and arm64), as Pillow does: the same JPEG pixels to the bit, no colour-profile
 * conversion and no EXIF rotation, so its answers are the Python path's. */
"use strict";
const fs = require("fs");
const path = require("path");
const ort = require("onnxruntime-node");
const sharp = require("sharp");
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

/* An image file -> {data: Uint8Array, dims: [H, W, C]}: 8-bit pixels as the file holds them (C = 1 grey,
 * 3 RGB, 4 RGBA; grey with alpha loses its alpha, as the Python path's conversion drops it). ICC profiles are
 * ignored and EXIF orientation is not applied, as Pillow's decoder does in the Python path. */
async function decode(file) {
  let img = sharp(file, { ignoreIcc: true, failOn: "error", limitInputPixels: 178956970 });
  const meta = await img.metadata();
  if (meta.channels === 2) img = img.removeAlpha();
  const { data, info } = await img.raw({ depth: "uchar" }).toBuffer({ resolveWithObject: true });
  return { data: new Uint8Array(data.buffer, data.byteOffset, data.length), dims: [info.height, info.width, info.channels] };
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
      img = await decode(file);
    } catch (e) {
      fail(`cannot decode image ${file}: ${e.message.split("\n")[0]}`);
    }
    const out = await session.run({ image: new ort.Tensor("uint8", img.data, img.dims) },
                                  model.tasks.map((t) => t.probabilities));
    const per = model.tasks.map((t) => [t.name, topK(out[t.probabilities].data, t.labels, topk)]);
    const predictions = per.length === 1 ? per[0][1] : Object.fromEntries(per);
    process.stdout.write(pyJSON({ image: file, predictions }) + "\n");
  }
}

main(process.argv.slice(2)).catch((e) => fail(e.message.split("\n")[0]));
