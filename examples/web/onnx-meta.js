/* Read an ONNX file's metadata_props (ModelProto field 14: key/value strings) from its bytes, with no
 * protobuf library: onnxruntime-node and onnxruntime-web do not expose an edgexfer file's labels and
 * metadata. Works as a CommonJS module (Node.js) and as a browser script (window.onnxMeta). */
(function (root, factory) {
  if (typeof module === "object" && module.exports) module.exports = factory();
  else root.onnxMeta = factory();
})(typeof self !== "undefined" ? self : this, function () {
  "use strict";
  const utf8 = new TextDecoder("utf-8");

  function varint(buf, pos) {
    let value = 0, scale = 1, b;
    do {
      if (pos >= buf.length) throw new Error("truncated ONNX file");
      b = buf[pos++];
      value += (b & 0x7f) * scale;   // no bit shifts: lengths may pass 2^31
      scale *= 128;
    } while (b & 0x80);
    return [value, pos];
  }

  /* Fields of one protobuf message in buf[start, end): calls visit(field, wireType, start, end) for
   * each length-delimited field, skips the others. */
  function fields(buf, start, end, visit) {
    let pos = start;
    while (pos < end) {
      let tag;
      [tag, pos] = varint(buf, pos);
      const field = Math.floor(tag / 8), wire = tag % 8;
      if (wire === 0) [, pos] = varint(buf, pos);
      else if (wire === 1) pos += 8;
      else if (wire === 5) pos += 4;
      else if (wire === 2) {
        let len;
        [len, pos] = varint(buf, pos);
        visit(field, pos, pos + len);
        pos += len;
      } else throw new Error(`unsupported protobuf wire type ${wire}`);
    }
  }

  /* bytes (Uint8Array or ArrayBuffer) of an ONNX model -> {key: value} of its metadata_props. */
  function readMetadata(bytes) {
    const buf = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
    const props = {};
    fields(buf, 0, buf.length, (field, s, e) => {
      if (field !== 14) return;                 // ModelProto.metadata_props
      let key = "", value = "";
      fields(buf, s, e, (f, a, b) => {
        if (f === 1) key = utf8.decode(buf.subarray(a, b));
        else if (f === 2) value = utf8.decode(buf.subarray(a, b));
      });
      props[key] = value;
    });
    return props;
  }

  /* The edgexfer end-to-end contract of a file: {meta, e2e, tasks: [{name, labels, probabilities}]}. */
  function edgexferModel(bytes) {
    const props = readMetadata(bytes);
    if (!props["edgexfer.e2e"]) throw new Error("not an edgexfer end-to-end file (no 'edgexfer.e2e' metadata); " +
                                                "use model.e2e.onnx, written by edgexfer export/quantize");
    const meta = JSON.parse(props["edgexfer.meta"]), e2e = JSON.parse(props["edgexfer.e2e"]);
    const tasks = meta.tasks.map((t) => ({ name: t.name, labels: t.labels.map(String),
                                          probabilities: e2e.tasks[t.name].probabilities }));
    return { meta, e2e, tasks, props };
  }

  /* Probabilities (a typed array) -> the top k as edgexfer predict prints them: {label, index, score}. */
  function topK(probs, labels, k) {
    const idx = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || a - b);
    return idx.slice(0, Math.max(1, Math.min(k, probs.length)))
      .map((i) => ({ label: labels[i], index: i, score: Number.isFinite(probs[i]) ? probs[i] : null }));
  }

  return { readMetadata, edgexferModel, topK };
});
