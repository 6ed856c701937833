/* The page: load an edgexfer end-to-end model (model.e2e.onnx: decoded uint8 pixels in, probabilities
 * out) with onnxruntime-web's WASM backend, served from this page's own origin (vendor/: no CDN), and
 * classify the images given to it. ?model=URL picks another file. For tests, ?images=a.png,b.png
 * classifies those (their ?top_k=K best classes, 3 unless given) and POSTs the results as JSON to
 * ?report=URL. */
"use strict";
const params = new URLSearchParams(location.search);
const MODEL_URL = params.get("model") || "model.e2e.onnx";
const LIST_TOP_K = Math.max(1, parseInt(params.get("top_k"), 10) || 3);
const $ = (id) => document.getElementById(id);
ort.env.wasm.wasmPaths = new URL("vendor/", location.href).href;
ort.env.wasm.numThreads = 1;   // threads need cross-origin isolation, which a plain static server lacks

let session, model;

function fmtPct(x) { return (100 * x).toFixed(1) + "%"; }

function cardLine(meta, bytes) {
  const m = meta.metrics || {}, p = meta.provenance || {}, parts = [];
  parts.push(`${meta.tasks[0].labels.length} classes`);
  if (p.backbone) parts.push(p.backbone);
  parts.push(meta.quantization ? "INT8" : "FP32");
  parts.push(`${(bytes / 1e6).toFixed(1)} MB`);
  if (typeof m.accuracy === "number") parts.push(`accuracy ${m.accuracy.toFixed(3)}` + (m.n ? ` on ${m.n} ${m.split || "test"} images` : ""));
  if (typeof m.macro_f1 === "number") parts.push(`macro-F1 ${m.macro_f1.toFixed(3)}`);
  if (typeof m.accuracy !== "number") parts.push("not evaluated yet (edgexfer evaluate writes the figures into the file)");
  return parts.join(" · ");
}

async function load() {
  const res = await fetch(MODEL_URL);
  if (!res.ok) throw new Error(`cannot fetch ${MODEL_URL}: HTTP ${res.status}`);
  const bytes = new Uint8Array(await res.arrayBuffer());
  model = onnxMeta.edgexferModel(bytes);
  const t0 = performance.now();
  session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  // one warm-up call, so that the latency shown is a steady call's, not WebAssembly's first
  await session.run({ image: new ort.Tensor("uint8", new Uint8Array(64 * 64 * 3), [64, 64, 3]) });
  $("card").textContent = cardLine(model.meta, bytes.length);
  $("status").textContent = `model ready in ${(performance.now() - t0).toFixed(0)} ms (onnxruntime-web ${ort.env.versions ? ort.env.versions.web : ""}, WASM)`;
}

/* A Blob or URL -> decoded RGBA pixels, as drawn without colour management or premultiplication. */
async function pixels(src) {
  const blob = src instanceof Blob ? src : await (await fetch(src)).blob();
  const bmp = await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = new OffscreenCanvas(bmp.width, bmp.height);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  const data = ctx.getImageData(0, 0, bmp.width, bmp.height).data;
  return { data: new Uint8Array(data.buffer, data.byteOffset, data.length), h: bmp.height, w: bmp.width, blob };
}

async function classify(src, topk = 3) {
  const img = await pixels(src);
  const t0 = performance.now();
  const out = await session.run({ image: new ort.Tensor("uint8", img.data, [img.h, img.w, 4]) },
                                [model.tasks[0].probabilities]);
  const ms = performance.now() - t0;
  const t = model.tasks[0];
  return { predictions: onnxMeta.topK(out[t.probabilities].data, t.labels, topk), ms, blob: img.blob };
}

function show(r) {
  $("preview").src = URL.createObjectURL(r.blob);
  $("top").innerHTML = "";
  for (const p of r.predictions) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td></td><td>${fmtPct(p.score)}</td><td><span class="bar" style="width:${Math.max(1, 120 * p.score)}px"></span></td>`;
    tr.firstChild.textContent = p.label;
    $("top").appendChild(tr);
  }
  $("latency").textContent = `${r.ms.toFixed(1)} ms in this browser (resize, crop, normalise and the model; decoding excluded)`;
}

async function onFile(file) {
  if (!file) return;
  try { show(await classify(file)); } catch (e) { $("status").textContent = `error: ${e.message}`; }
}

$("file").addEventListener("change", (e) => onFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); onFile(e.dataTransfer.files[0]); });

load().then(async () => {
  const images = params.get("images");
  if (!images) return;
  const results = [];
  let last;
  for (const url of images.split(",")) {
    try {
      last = await classify(url, LIST_TOP_K);
      results.push({ image: url, predictions: last.predictions, ms: last.ms });
    } catch (e) {
      results.push({ image: url, error: e.message });
    }
  }
  if (last) show(last);
  window.edgexferResults = results;
  document.body.dataset.done = "1";
  const report = params.get("report");
  if (report) await fetch(report, { method: "POST", body: JSON.stringify(results) });
}).catch((e) => {
  $("status").textContent = `error: ${e.message}`;
  window.edgexferResults = { error: e.message };
  document.body.dataset.done = "1";
  const report = params.get("report");
  if (report) fetch(report, { method: "POST", body: JSON.stringify({ error: e.message }) });
});
