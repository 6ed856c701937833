"""Labelled image sets: the offline Fashion-MNIST default, your own ImageFolder trees, and CSV files.

A CSV file names an image and one label per task: `path,label[,label2,...]` with a header row whose
column names become the task names (several label columns train one head per task). An empty
cell leaves that image unlabelled for that task (the first task needs every label); an optional
`split` column (train/val/test) is honoured as given.

A `Dataset` holds its splits as lists of image sources (paths or uint8 arrays) with integer labels;
images become tensors only through the runtime's preprocessing (`edgexfer.runtime.preprocess`), so
training, calibration and the device all see the same pixels.
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgexfer.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLIT_NAMES = ("train", "val", "test")

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


@dataclass
class Split:
    images: list[Any]          # paths (str) or uint8 arrays (H, W[, C])
    labels: np.ndarray         # int64 (N,): the first task's labels
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the other tasks' labels; -1: unlabelled

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "Split":
        idx = np.asarray(idx, dtype=np.int64)
        return Split([self.images[i] for i in idx], self.labels[idx], {k: v[idx] for k, v in self.extra.items()})

    def targets(self) -> np.ndarray:
        """(N, tasks) int64: the first task's labels, then each other task's (-1 where unlabelled)."""
        return np.stack([self.labels, *self.extra.values()], axis=1) if self.extra else self.labels[:, None]


@dataclass
class Dataset:
    source: str
    classes: list[str]         # the first task's classes
    train: Split
    val: Split
    test: Split
    skipped: list[str] = field(default_factory=list)  # corrupt images that were left out
    task_names: list[str] = field(default_factory=lambda: ["label"])
    extra_classes: dict[str, list[str]] = field(default_factory=dict)  # the other tasks' classes
    unreadable: list[str] = field(default_factory=list)  # image files that could not be read, left out
    left_out: int = 0          # labelled images not used because --shots limited them (0: every one used)
    unused: Split | None = None  # those images (where the loader keeps them): never fitted, the INT8 guard's too

    @property
    def tasks(self) -> dict[str, list[str]]:
        """Task name -> classes, the first task first: one head (and one ONNX output) each."""
        return {self.task_names[0]: list(self.classes), **{k: list(v) for k, v in self.extra_classes.items()}}

    def summary(self) -> dict:
        def per_class(s: Split) -> dict:
            counts = np.bincount(s.labels, minlength=len(self.classes))
            return {c: int(n) for c, n in zip(self.classes, counts)}

        train_counts = np.bincount(self.train.labels, minlength=len(self.classes))
        nonzero = train_counts[train_counts > 0]
        return {
            "source": self.source,
            "classes": list(self.classes),
            "train": len(self.train), "val": len(self.val), "test": len(self.test),
            "train_per_class": per_class(self.train),
            "test_per_class": per_class(self.test),
            "imbalance_ratio": float(nonzero.max() / nonzero.min()) if nonzero.size else None,
            "skipped_corrupt": list(self.skipped),
            "skipped_unreadable": list(self.unreadable),
            "labelled_left_out": self.left_out,
            **({"tasks": {name: {"classes": cls, "train_per_class": {
                c: int(n) for c, n in zip(cls, np.bincount(self.train.extra[name][self.train.extra[name] >= 0],
                                                            minlength=len(cls)))},
                "train_unlabelled": int(np.sum(self.train.extra[name] < 0))}
                for name, cls in self.extra_classes.items()}} if self.extra_classes else {}),
        }


# -- splitting -------------------------------------------------------------------------------------

def stratified_take(labels: np.ndarray, per_class: int | None, rng: np.random.Generator,
                    exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of up to `per_class` random items of each class (all of them if None)."""
    mask = np.ones(len(labels), bool)
    if exclude is not None and len(exclude):
        mask[exclude] = False
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero((labels == c) & mask)
        rng.shuffle(idx)
        out.append(idx if per_class is None else idx[:per_class])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Split indices by class into parts of the given fractions (the last part takes the rest)."""
    parts: list[list[int]] = [[] for _ in fractions]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = len(idx)
        start = 0
        for k, f in enumerate(fractions):
            take = n - start if k == len(fractions) - 1 else max(1 if n >= len(fractions) else 0, int(round(f * n)))
            if n >= len(fractions):  # leave at least one item for each later part (2 shots: 1 train, 1 val)
                take = min(take, n - start - (len(fractions) - 1 - k))
            parts[k].extend(idx[start:start + take])
            start += take
    return [np.sort(np.asarray(p, np.int64)) for p in parts]


def split_labelled(labels: np.ndarray, shots: int | None, val_fraction: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Take `shots` labelled items per class, then carve a validation part out of them.

    The validation images count against the label budget: `shots` is every label the model saw.
    """
    pool = stratified_take(labels, shots, rng)
    if val_fraction <= 0:
        return pool, np.zeros(0, np.int64)
    tr, va = stratified_split(labels[pool], (1 - val_fraction, val_fraction), rng)
    return pool[tr], pool[va]


def three_way_split(labels: np.ndarray, classes: list[str], shots: int | None, val_fraction: float,
                    test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified test split first, then `shots` labelled images per class carved into train and val."""
    counts = np.bincount(labels, minlength=len(classes))
    if counts.min() < 3:
        raise DataError(f"class '{classes[int(counts.argmin())]}' has {counts.min()} images; "
                        "each class needs at least 3 (train, val and test)")
    rest, te = stratified_split(labels, (1 - test_fraction, test_fraction), rng)
    tr, va = split_labelled(labels[rest], shots, val_fraction, rng)
    return rest[tr], rest[va], te


# -- Fashion-MNIST (Debian package dataset-fashion-mnist) ------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("EDGEXFER_FASHION_MNIST", FASHION_MNIST_DIR))


def load_fashion_mnist(*, shots: int | None = 100, val_fraction: float = 0.2, test_size: int | None = 2000,
                       seed: int = 0) -> Dataset:
    """Real Fashion-MNIST: a few-shot labelled subset of its training set, a stratified test sample.

    `shots` labels per class in all (train + val); `test_size` images from the official test set
    (stratified; None for all 10,000).
    """
    root = fashion_mnist_dir()
    files = {k: root / f"{k}-ubyte.gz" for k in
             ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found at {root} (missing {missing[0]}); "
                        "install it with `apt-get install dataset-fashion-mnist` or set EDGEXFER_FASHION_MNIST")
    rng = np.random.default_rng(seed)
    x_tr, y_tr = _read_idx(files["train-images-idx3"]), _read_idx(files["train-labels-idx1"]).astype(np.int64)
    x_te, y_te = _read_idx(files["t10k-images-idx3"]), _read_idx(files["t10k-labels-idx1"]).astype(np.int64)
    tr, va = split_labelled(y_tr, shots, val_fraction, rng)
    te = np.arange(len(y_te)) if test_size is None else stratified_take(y_te, max(1, test_size // 10), rng)
    as_split = lambda x, y, idx: Split([x[i] for i in idx], y[idx])  # noqa: E731
    unused = np.setdiff1d(np.arange(len(y_tr)), np.concatenate([tr, va]))
    return Dataset(
        source=f"fashion-mnist:{root}",
        classes=list(FASHION_MNIST_CLASSES),
        train=as_split(x_tr, y_tr, tr), val=as_split(x_tr, y_tr, va), test=as_split(x_te, y_te, te),
        unused=as_split(x_tr, y_tr, unused),
    )


# -- ImageFolder trees -----------------------------------------------------------------------------

def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _image_problem(p: Path) -> tuple[str, str] | None:
    """None when `p` decodes to its last pixel; else ("unreadable", why) when the file cannot be read
    (permissions, I/O error), or ("corrupt", why) when it is not a whole image. `verify()` alone misses a
    truncated file (it checks structure, and JPEG hardly at all), so the image is also decoded in full."""
    try:
        with Image.open(p) as im:
            im.verify()  # structure and checksums (PNG CRCs); leaves the image unusable
        with Image.open(p) as im:
            im.load()    # a truncated file fails only here
        return None
    except OSError as e:
        if e.errno is not None:  # from the OS (Pillow's own OSErrors carry no errno)
            return "unreadable", e.strerror or str(e)
        return "corrupt", str(e) or type(e).__name__
    except Exception as e:  # any other decoder failure means the file is unusable
        return "corrupt", str(e) or type(e).__name__


def _refuse_or_note(p: Path, problem: tuple[str, str], strict: bool, skipped: list[str], unreadable: list[str]) -> None:
    """--strict: the image's problem as a DataError; else note the image as skipped (and say why). A symbolic
    link out of the data folder ("outside") is counted with the unreadable images."""
    kind, why = problem
    if kind == "outside":
        if strict:
            raise DataError(f"{p} is a symbolic link out of the data folder ({why}); pass --follow-symlinks to "
                            "follow it, or drop --strict to skip it")
        unreadable.append(str(p))
        log.warning("skipping %s: a symbolic link out of the data folder (%s); --follow-symlinks follows it", p, why)
        return
    if strict:
        if kind == "unreadable":
            raise DataError(f"unreadable image: {p} ({why}); fix its permissions, or drop --strict to skip it")
        raise DataError(f"corrupt image: {p} ({why}); remove it, or drop --strict to skip corrupt images")
    (unreadable if kind == "unreadable" else skipped).append(str(p))
    log.warning("skipping %s image %s (%s)", kind, p, why)


def leads_outside(p: Path, root: Path, *, written_in: Path | None = None) -> str | None:
    """Where `p` leads ("to TARGET") when it resolves out of `root` (a resolved folder), else None. With
    `written_in`, only a path written inside that folder counts: an absolute path elsewhere in a CSV file is
    the user's explicit choice, not a symbolic link's doing."""
    if written_in is not None:
        lexical, folder = Path(os.path.abspath(p)), Path(os.path.abspath(written_in))
        if lexical != folder and folder not in lexical.parents:
            return None
    real = p.resolve()
    return None if real == root or root in real.parents else f"to {real}"


def check_class_name(name: str, where: str) -> None:
    """DataError for a class name no label list can hold (a control character: labels.txt, the ONNX file's
    `labels` entry and Triton's label files are one name per line), naming `where` it came from."""
    from edgexfer.runtime.labels import refusal

    why = refusal(name)
    if why:
        raise DataError(f"{where}: {why}; names are written one per line (labels.txt), so rename it")


def scan_image_folder(root: Path, *, strict: bool = False, classes: list[str] | None = None,
                      follow_symlinks: bool = False, data_root: Path | None = None
                      ) -> tuple[list[str], list[str], np.ndarray, list[str], list[str]]:
    """(classes, paths, labels, skipped corrupt, skipped unreadable) of a folder with one sub-folder per class.

    Symbolic links (class folders or images) that lead out of `data_root` (default `root`) are skipped and
    counted with the unreadable images, unless `follow_symlinks`: the data stays inside the data folder."""
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    data_root = (data_root or root).resolve()
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for name in found:
        check_class_name(name, f"class folder in {root}")
    skipped, unreadable = [], []
    away = {} if follow_symlinks else {c: w for c in found if (w := leads_outside(root / c, data_root))}
    for c, where in away.items():
        _refuse_or_note(root / c, ("outside", where), strict, skipped, unreadable)
    found = [c for c in found if c not in away]
    if classes is None:
        classes = found
        if len(classes) < 2:
            raise DataError(f"{root} needs at least two class folders (one folder per class); found {len(classes)}")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"{root} has class folders not in the training classes: {unknown}")
    paths, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(p for p in (root / c).rglob("*") if _is_image(p)) if c not in away and (root / c).is_dir() else []
        good = []
        for p in files:
            where = None if follow_symlinks else leads_outside(p, data_root)
            problem = ("outside", where) if where else _image_problem(p)
            if problem is None:
                good.append(p)
            else:
                _refuse_or_note(p, problem, strict, skipped, unreadable)
        if not good and (root / c).is_dir() and c not in away:
            raise DataError(f"class folder {root / c} holds no readable images")
        paths += [str(p) for p in good]
        labels += [k] * len(good)
    return classes, paths, np.asarray(labels, np.int64), skipped, unreadable


def load_image_folder(root: str | os.PathLike, *, shots: int | None = None, val_fraction: float = 0.15,
                      test_fraction: float = 0.2, seed: int = 0, strict: bool = False,
                      follow_symlinks: bool = False) -> Dataset:
    """An ImageFolder tree: `root/<class>/*.jpg`, or ready-made `root/{train,val,test}/<class>/...`.

    Ready-made splits are honoured as given (`shots` then limits the train split only); otherwise
    the images are split by class with `seed`, then `shots` limits the labelled train+val pool.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    rng = np.random.default_rng(seed)
    links = {"follow_symlinks": follow_symlinks, "data_root": root}
    if (root / "train").is_dir() and (root / "test").is_dir():
        classes, p_tr, y_tr, sk, un = scan_image_folder(root / "train", strict=strict, **links)
        if (root / "val").is_dir():
            _, p_va, y_va, sk2, un2 = scan_image_folder(root / "val", strict=strict, classes=classes, **links)
            tr = va = stratified_take(y_tr, shots, rng)
            train, val = Split([p_tr[i] for i in tr], y_tr[tr]), Split(p_va, y_va)
        else:
            sk2, un2 = [], []
            tr, va = split_labelled(y_tr, shots, val_fraction, rng)
            train, val = Split([p_tr[i] for i in tr], y_tr[tr]), Split([p_tr[i] for i in va], y_tr[va])
        _, p_te, y_te, sk3, un3 = scan_image_folder(root / "test", strict=strict, classes=classes, **links)
        unused = np.setdiff1d(np.arange(len(y_tr)), np.concatenate([tr, va]).astype(np.int64))
        return Dataset(f"imagefolder:{root}", classes, train, val, Split(p_te, y_te), sk + sk2 + sk3,
                       unreadable=un + un2 + un3, left_out=len(unused),
                       unused=Split([p_tr[i] for i in unused], y_tr[unused]))

    classes, paths, labels, skipped, unreadable = scan_image_folder(root, strict=strict, **links)
    tr, va, te = three_way_split(labels, classes, shots, val_fraction, test_fraction, rng)
    sub = lambda idx: Split([paths[i] for i in idx], labels[idx])  # noqa: E731
    unused = np.setdiff1d(np.arange(len(labels)), np.concatenate([tr, va, te]).astype(np.int64))
    return Dataset(f"imagefolder:{root}", classes, sub(tr), sub(va), sub(te), skipped, unreadable=unreadable,
                   left_out=len(unused), unused=sub(unused))


# -- CSV files: path,label[,label2,...] -----------------------------------------------------------

PATH_COLUMNS = ("path", "image", "file", "filename")


def load_csv(csv_path: str | os.PathLike, *, shots: int | None = None, val_fraction: float = 0.15,
             test_fraction: float = 0.2, seed: int = 0, strict: bool = False, follow_symlinks: bool = False) -> Dataset:
    """A CSV file with a header: an image column (path, image, file or filename; relative paths are
    relative to the CSV's folder), one column per task, and optionally `split` (train/val/test).

    Splits are stratified on the first task with `seed` unless a `split` column gives them;
    `shots` limits the labelled images per class of the first task.
    """
    import csv

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"CSV file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{csv_path} is empty")
    header = [h.strip() for h in rows[0]]
    if not header or header[0].lower() not in PATH_COLUMNS:
        raise DataError(f"{csv_path}: the first column must be the image path, headed one of {PATH_COLUMNS}; "
                        f"found {header[0] if header else 'nothing'!r}")
    split_col = header.index("split") if "split" in header else None
    task_cols = [i for i in range(1, len(header)) if i != split_col]
    if not task_cols:
        raise DataError(f"{csv_path}: no label column (expected path,label[,label2,...])")
    names = [header[i] for i in task_cols]
    for name in names:
        check_class_name(name, f"{csv_path}:1: task column")
    if len(set(names)) != len(names) or any(not n for n in names):
        raise DataError(f"{csv_path}: label columns need distinct, non-empty names; found {names}")
    paths, raw, splits, skipped, unreadable, missing = [], [], [], [], [], []
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise DataError(f"{csv_path}:{n}: {len(row)} fields, the header has {len(header)}")
        for i in task_cols:
            check_class_name(row[i].strip(), f"{csv_path}: row {n}, column {header[i]!r}")
        p = Path(row[0].strip())
        p = p if p.is_absolute() else csv_path.parent / p
        if not p.is_file():
            missing.append(str(p))
            continue
        where = None if follow_symlinks else leads_outside(p, csv_path.parent.resolve(), written_in=csv_path.parent)
        problem = ("outside", where) if where else _image_problem(p)
        if problem is not None:
            _refuse_or_note(p, problem, strict, skipped, unreadable)
            continue
        labels = [row[i].strip() for i in task_cols]
        if not labels[0]:
            raise DataError(f"{csv_path}:{n}: no label for the first task {names[0]!r} (every image needs one)")
        if split_col is not None:
            sp = row[split_col].strip().lower()
            if sp not in SPLIT_NAMES:
                raise DataError(f"{csv_path}:{n}: split {sp!r} is not one of {SPLIT_NAMES}")
            splits.append(sp)
        paths.append(str(p))
        raw.append(labels)
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} image(s) not found, e.g. {missing[0]}")
    if not paths:
        raise DataError(f"{csv_path} lists no readable images")
    classes = [sorted({r[t] for r in raw if r[t]}) for t in range(len(names))]
    for name, cls in zip(names, classes):
        if len(cls) < 2:
            raise DataError(f"{csv_path}: task {name!r} needs at least two classes; found {cls}")
    y = np.asarray([[classes[t].index(r[t]) if r[t] else -1 for t in range(len(names))] for r in raw], np.int64)

    def sub(idx) -> Split:
        idx = np.asarray(idx, np.int64)
        return Split([paths[i] for i in idx], y[idx, 0], {names[t]: y[idx, t] for t in range(1, len(names))})

    rng = np.random.default_rng(seed)
    labels = y[:, 0]
    if split_col is not None:
        sp = np.asarray(splits)
        tr_all, va, te = (np.flatnonzero(sp == k) for k in SPLIT_NAMES)
        if not len(tr_all) or not len(te):
            raise DataError(f"{csv_path}: the split column needs train and test rows")
        tr = tr_all[stratified_take(labels[tr_all], shots, rng)]
        if not len(va):
            t2, v2 = split_labelled(labels[tr], None, val_fraction, rng)
            tr, va = tr[t2], tr[v2]
    else:
        tr, va, te = three_way_split(labels, classes[0], shots, val_fraction, test_fraction, rng)
    return Dataset(f"csv:{csv_path}", classes[0], sub(tr), sub(va), sub(te), skipped, names,
                   {names[t]: classes[t] for t in range(1, len(names))}, unreadable,
                   left_out=len(labels) - len(tr) - len(va) - len(te))


def load_dataset(data: str | None, **kw) -> Dataset:
    """`None` or "fashion-mnist" -> the offline default; a .csv file -> `load_csv`; else an ImageFolder path."""
    if data in (None, "", "fashion-mnist"):
        for k in ("strict", "test_fraction", "follow_symlinks"):
            kw.pop(k, None)
        return load_fashion_mnist(**kw)
    kw.pop("test_size", None)
    if str(data).lower().endswith(".csv"):
        return load_csv(data, **kw)
    return load_image_folder(data, **kw)


SMALL_IMAGE_SIDE = 64   # median shorter side below this: small images (Fashion-MNIST's 28 px, digits)
SMALL_IMAGE_SIZE = 96   # the input size measured best for them (benchmarks/RESULTS.md, the demo)
FASHION_MNIST_SIDE = 28


def auto_image_size(data: str | None, pretrained_size: int, *, sample: int = 64, seed: int = 0,
                    follow_symlinks: bool = False) -> tuple[int, str]:
    """`--image-size auto`: the backbone's pretraining resolution for photos; a smaller input only when
    the images themselves are small (upsampling 28 px to 224 px adds time, not detail). Reads the
    headers of a seeded sample of the images (no decoding). Returns (size, why)."""
    return _auto_size(data, pretrained_size, sample=sample, seed=seed, follow_symlinks=follow_symlinks)[:2]


def _auto_size(data: str | None, pretrained_size: int, *, sample: int, seed: int,
               follow_symlinks: bool) -> tuple[int, str, str | None]:
    """auto_image_size's (size, why), and for photos (not small images) what was measured (None otherwise)."""
    if data in (None, "", "fashion-mnist"):
        side, what = FASHION_MNIST_SIDE, "Fashion-MNIST's 28x28 images"
    else:
        root = Path(data)
        if root.is_file():  # a CSV: its first column names the images
            import csv

            with open(root, newline="", encoding="utf-8-sig") as f:
                rows = [r for r in list(csv.reader(f))[1:] if r and r[0].strip()]
            paths = [Path(r[0].strip()) if Path(r[0].strip()).is_absolute() else root.parent / r[0].strip()
                     for r in rows]
        else:
            paths = [p for p in root.rglob("*") if _is_image(p)]
        if not follow_symlinks:  # what data loading leaves out is not measured either
            folder = root if root.is_dir() else root.parent
            paths = [p for p in paths if not leads_outside(p, folder.resolve(), written_in=folder)]
        paths = sorted(paths)
        pick = np.random.default_rng(seed).permutation(len(paths))[:sample]
        sides = []
        for i in pick:
            try:
                with Image.open(paths[i]) as im:
                    sides.append(min(im.size))
            except Exception:  # unreadable images are reported when the data loads
                continue
        if not sides:
            return (pretrained_size, f"no readable image to measure: the backbone's pretraining resolution, "
                    f"{pretrained_size}", None)
        side = int(np.median(sides))
        what = f"the median shorter side of {len(sides)} sampled images is {side} px"
    if side < SMALL_IMAGE_SIDE:
        size = min(SMALL_IMAGE_SIZE, pretrained_size)
        return size, (f"{what} (< {SMALL_IMAGE_SIDE}): small images, so {size} px, the size measured best for "
                      f"them, instead of the backbone's pretraining resolution {pretrained_size}"), None
    return pretrained_size, f"{what}: photos, so the backbone's pretraining resolution, {pretrained_size} px", what


FIXRES_FACTOR = 1.15  # the larger input `--backbone auto` also tries on photos, as a multiple of the pretraining size


def fixres_size(size: int) -> int:
    """`FIXRES_FACTOR` times `size`, rounded to a multiple of 4 (224 -> 256, 240 -> 276, 260 -> 300)."""
    return int(round(size * FIXRES_FACTOR / 4) * 4)


def auto_image_sizes(data: str | None, pretrained_size: int, *, seed: int = 0,
                     follow_symlinks: bool = False) -> list[tuple[int, str]]:
    """The input sizes `--backbone auto` compares a backbone at under `--image-size auto`, each with why: the
    size `auto_image_size` gives, and for photos also `fixres_size` of the pretraining resolution. Why the
    larger one: EfficientNet-Lite (like most ImageNet backbones) was pretrained on random-resized crops, which
    show an object larger than a centre crop of the same size does, so a network evaluated on whole photos
    often reads them better at about 1.15x its training size (Touvron et al., "Fixing the train-test resolution
    discrepancy", NeurIPS 2019); whether it does on these photos is left to the same held-out accuracy that
    chooses the backbone (benchmarks/RESULTS.md measures both sizes on both development sets). Small images get
    no larger candidate: upsampling them further adds time, not detail."""
    size, why, photos = _auto_size(data, pretrained_size, sample=64, seed=seed, follow_symlinks=follow_symlinks)
    if photos is None:
        return [(size, why)]
    big = fixres_size(pretrained_size)
    return [(size, why), (big, f"{photos}: photos, so {big} px, {FIXRES_FACTOR:g}x the backbone's pretraining resolution "
                               f"{pretrained_size} px (objects larger, as its random-resized crops showed them in "
                               "pretraining), chosen with the backbone by `--backbone auto`'s comparison")]


def list_images(root: str | os.PathLike, *, follow_symlinks: bool = False) -> list[str]:
    """Every readable image under `root` (recursively), sorted: unlabelled images, e.g. for --adapt-bn and
    --guard-data. Symbolic links that lead out of `root` are skipped (and counted in the log) unless
    `follow_symlinks`: the data stays inside the data folder, as for labelled data."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    files, skipped, unreadable = [], [], []
    real_root, away = root.resolve(), 0
    for p in sorted((p for p in root.rglob("*") if _is_image(p)), key=str):
        if not follow_symlinks and leads_outside(p, real_root):
            away += 1
            continue
        problem = _image_problem(p)
        if problem is None:
            files.append(str(p))
        else:
            _refuse_or_note(p, problem, False, skipped, unreadable)
    if away:
        log.warning("%s: skipped %d symbolic link(s) that lead out of the folder (--follow-symlinks to use them)",
                    root, away)
    if not files:
        raise DataError(f"{root} holds no readable images")
    return files
