"""`EdgeModel`: an edgexfer ONNX file, ready to predict. Needs numpy, onnxruntime and Pillow only."""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from edgexfer.runtime.errors import MetadataError, RuntimeInputError
from edgexfer.runtime.metadata import ModelMeta
from edgexfer.runtime.preprocess import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS, ImageLimits, load_image, preprocess

log = logging.getLogger(__name__)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ONNX Runtime's CPU arena keeps the largest activations it ever held (a 16 MB request's: ~100 MB for a small
# CNN) for the rest of the process. A session that ran an input this large is remembered, and `shrink_arenas`
# (a server's, once quiet after a burst: protocol.release_memory) gives its arena's free chunks back.
SHRINK_AFTER_BYTES = 4 * 1024 * 1024
_SHRINK = ort.RunOptions()
_SHRINK.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
_grown: set = set()  # EdgeModels whose arena may have grown since the last shrink_arenas
_grown_lock = threading.Lock()


def shrink_arenas() -> int:
    """A one-row run with arena shrinkage for each session that ran an input of SHRINK_AFTER_BYTES or more
    since the last call: its CPU arena's unused chunks go back to the allocator. How many were shrunk."""
    with _grown_lock:
        grown = list(_grown)
        _grown.clear()
    for m in grown:
        try:
            m.session.run(m.output_names, {m.input_name: np.zeros((1, *m.input_shape), np.float32)}, _SHRINK)
        except Exception as e:  # memory housekeeping must never fail a request
            log.debug("arena shrink failed: %s", e)
    return len(grown)


def session_options(threads: int | None = None, graph_optimization: str = "all",
                    spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime options. `spinning=False` stops idle worker threads from busy-waiting, which
    benchmarks need so that one model's spinning threads do not slow the next model measured."""
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[graph_optimization]
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class EdgeModel:
    """Load an edgexfer ONNX file (path or bytes), or the same model in another runtime's format (OpenVINO IR
    `model.xml`, ExecuTorch `model.pte`: `edgexfer.runtime.backends`, with that runtime's package installed),
    and predict from images.

    >>> m = EdgeModel("runs/demo/model.int8.onnx", threads=2)
    >>> m.predict("cat.jpg", top_k=3)      # one image -> list of {label, index, score}
    >>> m.predict(["a.png", "b.png"])      # several -> one such list per image
    >>> m.run(x)                            # preprocessed float32 (N,C,H,W) -> {task: logits}

    The file's metadata is checked against its graph at load (one input, float32 NCHW of the metadata's
    size; each task's output present, of one score per label): a file that loads can be served, and one
    that cannot is a `MetadataError`. Images are bounded by `max_image_pixels` (decoded, and after the
    resize; `ImageTooLarge`) and `max_aspect_ratio` (`ImageError`), checked before decoding.

    `predict` runs the end-to-end file beside a model file (``model.e2e.onnx`` beside ``model.onnx``:
    `edgexfer.exporters.e2e`, preprocessing in the graph) when there is one and it is current with this
    file; `e2e=False` (or EDGEXFER_E2E=0) forces the Python preprocessing, the reference, and `e2e=True`
    requires the end-to-end file. `preprocess` and `run` always take the plain path. `e2e_used` says
    which path `predict` takes (known after the first call).
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        *,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        graph_optimization: str = "all",
        spinning: bool = True,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_aspect_ratio: float = MAX_ASPECT_RATIO,
        e2e: bool | None = None,
    ):
        source = "<bytes>" if isinstance(model, (bytes, bytearray)) else str(model)
        if not isinstance(model, (bytes, bytearray)) and not Path(model).is_file():
            raise FileNotFoundError(f"model file not found: {model}")
        self.path = None if source == "<bytes>" else Path(model)
        from edgexfer.runtime import backends

        if backends.format_of(model):  # OpenVINO IR, ExecuTorch (`edgexfer export RUN --format ...`)
            if e2e:
                raise MetadataError(f"e2e=True: {source} is a {backends.format_of(model)} file; the end-to-end "
                                    "file is ONNX's")
            self.session = backends.open_session(model, threads=threads)
            if not self.session.get_modelmeta().custom_metadata_map:
                raise MetadataError(backends.no_metadata(source))
            chosen, e2e = self.session.get_providers(), False
        else:
            self.session, chosen = self._onnx_session(model, source, providers, threads, graph_optimization, spinning)
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = ModelMeta.from_props(props, source)
        if hasattr(self.session, "describe"):  # a format whose tensors are named by the metadata (ExecuTorch)
            self.session.describe(self.meta)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [t.output for t in self.meta.tasks]
        self.threads = threads
        self.image_limits = ImageLimits(int(max_image_pixels), float(max_aspect_ratio))
        self._check_graph(source)
        if e2e is None and os.environ.get("EDGEXFER_E2E", "").strip().lower() in ("0", "no", "false", "off"):
            e2e = False
        self._e2e_wanted = e2e
        self._e2e_session = None
        self.e2e_used: bool | None = False if e2e is False or self.path is None else None
        self.e2e_why = "e2e=False" if e2e is False else None
        self._session_args = (threads, graph_optimization, spinning, chosen)
        if e2e:
            self._e2e()

    @staticmethod
    def _onnx_session(model, source: str, providers, threads, graph_optimization, spinning):
        available = ort.get_available_providers()
        wanted = list(providers) if providers else ["CPUExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if len(chosen) < len(wanted):
            log.warning("execution providers %s not available here (have %s); falling back",
                        [p for p in wanted if p not in available], available)
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        try:
            session = ort.InferenceSession(
                bytes(model) if source == "<bytes>" else str(model),
                sess_options=session_options(threads, graph_optimization, spinning=spinning),
                providers=chosen,
            )
        except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types
            raise MetadataError(f"cannot load {source} as an ONNX model: {e}") from None
        return session, chosen

    def _e2e(self):
        """The end-to-end session, loaded on first use; None (and `e2e_why` says why) when there is no
        current end-to-end file beside this one."""
        if self.e2e_used is not None:
            return self._e2e_session
        from edgexfer.runtime import e2e as e2e_mod

        path = e2e_mod.e2e_path(self.path)
        why = None
        if not path.is_file():
            why = f"no {path.name} beside {self.path.name}"
        else:
            threads, graph_optimization, spinning, chosen = self._session_args
            try:
                sess = ort.InferenceSession(str(path), sess_options=session_options(threads, graph_optimization,
                                                                                    spinning=spinning),
                                            providers=chosen)
            except Exception as e:  # onnxruntime's own error types
                why = f"cannot load {path.name}: {(str(e).splitlines() or [type(e).__name__])[0][:200]}"
            else:
                props = sess.get_modelmeta().custom_metadata_map
                c = e2e_mod.contract(props)
                mine = self.session.get_modelmeta().custom_metadata_map.get("edgexfer.meta", "")
                if c is None:
                    why = f"{path.name} carries no end-to-end contract"
                elif c.get("source_meta_sha256") != e2e_mod.meta_key(mine):
                    why = f"{path.name} was made from another {self.path.name} (re-exported or re-quantized since)"
                elif any(c["tasks"].get(t.name, {}).get("probabilities") is None for t in self.meta.tasks):
                    why = f"{path.name} lacks a task of {self.path.name}"
                else:
                    self._e2e_session = sess
                    self._e2e_outputs = [c["tasks"][t.name]["probabilities"] for t in self.meta.tasks]
        self.e2e_used, self.e2e_why = why is None, why
        if why is not None:
            if self._e2e_wanted:
                raise MetadataError(f"e2e=True: {why}; build it with edgexfer.exporters.e2e.write")
            if path.is_file():  # a file there that is not used deserves a word
                log.warning("predicting with the Python preprocessing: %s", why)
        return self._e2e_session

    def _check_graph(self, source: str) -> None:
        """The metadata against the graph: what `run`, `predict` and the servers rely on."""
        def refuse(why: str):
            raise MetadataError(f"{source}: its edgexfer metadata does not match its graph: {why}")

        inputs, outputs = self.session.get_inputs(), {o.name: o for o in self.session.get_outputs()}
        if len(inputs) != 1:
            refuse(f"{len(inputs)} graph inputs, one expected")
        i = inputs[0]
        if i.type != "tensor(float)":
            refuse(f"input {i.name!r} is {i.type}, float32 expected")
        want = self.input_shape
        if len(i.shape) != 4 or any(isinstance(d, int) and d != w for d, w in zip(i.shape[1:], want)):
            refuse(f"input {i.name!r} has shape {i.shape}; the metadata says [N, {', '.join(map(str, want))}]")
        probe = None
        for t in self.meta.tasks:
            o = outputs.get(t.output)
            if o is None:
                refuse(f"task {t.name!r} names output {t.output!r}; the graph's outputs are {sorted(outputs)}")
            if o.type not in ("tensor(float)", "tensor(float16)", "tensor(double)"):
                refuse(f"output {t.output!r} is {o.type}, float expected")
            if len(o.shape) != 2:
                refuse(f"output {t.output!r} has shape {o.shape}, [N, classes] expected")
            classes = o.shape[1]
            if not isinstance(classes, int):  # a symbolic size: one zero image tells
                if probe is None:
                    try:
                        probe = dict(zip(self.output_names, self.session.run(
                            self.output_names, {self.input_name: np.zeros((1, *want), np.float32)})))
                    except Exception as e:  # onnxruntime's own error types
                        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
                        refuse(f"it does not run on one image of its input shape ({why})")
                classes = probe[t.output].shape[-1] if probe[t.output].ndim == 2 else -1
            if classes != len(t.labels):
                refuse(f"output {t.output!r} gives {classes} scores per image for {len(t.labels)} labels of task "
                       f"{t.name!r}")

    # -- properties ----------------------------------------------------------------------------
    @property
    def labels(self) -> tuple[str, ...]:
        return self.meta.labels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        i = self.meta.input
        return (i.channels, i.height, i.width)

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    # -- inference -----------------------------------------------------------------------------
    def preprocess(self, images: Any | Sequence[Any]) -> np.ndarray:
        """Image(s) -> float32 (N, C, H, W) exactly as training preprocessed them."""
        items = images if _is_batch(images) else [images]
        return np.stack([preprocess(im, self.meta.preprocessing, self.image_limits) for im in items])

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Preprocessed float32 (N, C, H, W) -> raw logits per task name."""
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise RuntimeInputError(f"run() takes a float32 numpy array; got {getattr(x, 'dtype', type(x).__name__)}")
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise RuntimeInputError(f"expected shape (N, {', '.join(map(str, self.input_shape))}); got {x.shape}")
        if x.nbytes >= SHRINK_AFTER_BYTES:
            with _grown_lock:
                _grown.add(self)
        outs = self.session.run(self.output_names, {self.input_name: x})
        return {t.name: o for t, o in zip(self.meta.tasks, outs)}

    def predict(self, images: Any | Sequence[Any], top_k: int = 5):
        """Top-k labels with probabilities for one image or a batch.

        Single-task models return a list of {label, index, score} per image; multi-task models
        return a dict task -> that list.
        """
        batch = _is_batch(images)
        sess = self._e2e() if self.path is not None else None
        if sess is None:
            results = self.decode(self.run(self.preprocess(images)), top_k)
        else:
            results = [self._predict_e2e(sess, im, top_k) for im in (images if batch else [images])]
        return results if batch else results[0]

    def _predict_e2e(self, sess, image: Any, top_k: int):
        """One image through the end-to-end file: decoded (with the same limits) and fed as uint8 HWC."""
        from edgexfer.runtime.e2e import INPUT_NAME, image_array

        img = load_image(image, self.image_limits)
        w, h = img.size
        r = self.meta.preprocessing.resize
        short, long = min(w, h), max(w, h)
        if short != r and r * (r * long // short) > self.image_limits.max_pixels:
            from edgexfer.runtime.errors import ImageTooLarge

            raise ImageTooLarge(f"image of {w}x{h} pixels resizes to {r}x{r * long // short}, over the limit of "
                                f"{self.image_limits.max_pixels} pixels (--max-image-pixels)")
        probs = sess.run(self._e2e_outputs, {INPUT_NAME: image_array(img)})
        out = {}
        for task, p in zip(self.meta.tasks, probs):
            p = p[0].astype(np.float32)
            k = max(1, min(top_k, p.shape[0]))
            idx = np.argsort(-p, kind="stable")[:k]  # ties: the lower index first, in every binding
            out[task.name] = [{"label": task.labels[j], "index": int(j), "score": _score(p[j])} for j in idx]
        return out[self.meta.tasks[0].name] if len(self.meta.tasks) == 1 else out

    def decode(self, logits: dict[str, np.ndarray], top_k: int = 5) -> list:
        """Raw logits per task (as `run` returns them) -> per image, top-k {label, index, score}
        (single-task) or a dict task -> that list (multi-task)."""
        results = [dict() for _ in range(next(iter(logits.values())).shape[0])]
        for task in self.meta.tasks:
            probs = softmax(logits[task.name].astype(np.float32))
            k = max(1, min(top_k, probs.shape[1]))
            for i, p in enumerate(probs):
                idx = np.argsort(-p, kind="stable")[:k]  # ties: the lower index first, in every binding
                results[i][task.name] = [
                    {"label": task.labels[j], "index": int(j), "score": _score(p[j])} for j in idx
                ]
        if len(self.meta.tasks) == 1:
            results = [r[self.meta.tasks[0].name] for r in results]
        return results

    def __repr__(self) -> str:
        return f"EdgeModel({self.path or '<bytes>'}, tasks={[t.name for t in self.meta.tasks]}, providers={self.providers})"


def _score(p) -> float | None:
    """A probability for JSON: None where the model gave no number (NaN or infinite logits)."""
    p = float(p)
    return p if p == p and p not in (float("inf"), float("-inf")) else None


def _is_batch(images: Any) -> bool:
    if isinstance(images, (list, tuple)):
        return True
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return True
    return False
