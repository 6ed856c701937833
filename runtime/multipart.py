"""The file of a multipart/form-data upload (`curl -F image=@cat.jpg`), for both REST servers (through the data
plane): a parser whose work is bounded by the body's size and small. The boundary is read from the
Content-Type (its length and parameter count capped; RFC 2231 continuations refused), parts are found with
`bytes.find` on the delimiter (linear), at most MAX_PARTS of them, each with at most MAX_PART_HEAD bytes of
headers; a nested multipart part is bytes, not a file, and is never descended into. Every mistake is an
`HTTPError` 400 with one sentence. Standard library only.
"""
from __future__ import annotations

import re

from edgexfer.runtime.protocol import HTTPError

MAX_CONTENT_TYPE = 1024   # characters of the Content-Type header
MAX_PARAMS = 16           # parameters in it
MAX_PARTS = 16            # parts in a body (the image endpoint needs one)
MAX_PART_HEAD = 8192      # bytes of one part's headers
MAX_PART_HEADERS = 32     # header fields of one part
MAX_PADDING = 256         # transport padding after a delimiter (RFC 2046: whitespace before the CRLF)
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")  # RFC 2046 bchars
_PARAM = re.compile(r'\s*;\s*([^\s;=]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;]*))?')
_IDENTITY = frozenset({"", "binary", "8bit", "7bit"})


def boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type, checked."""
    if len(content_type) > MAX_CONTENT_TYPE:
        raise HTTPError(400, f"Content-Type of {len(content_type)} characters; at most {MAX_CONTENT_TYPE}")
    kind, _, rest = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise HTTPError(400, f"expected Content-Type multipart/form-data, got {kind.strip()[:60]!r}")
    params = rest.split(";")  # no bchar is ';', so a quoted boundary is never split
    if len(params) > MAX_PARAMS:
        raise HTTPError(400, f"Content-Type with more than {MAX_PARAMS} parameters")
    found = None
    for p in params:
        key, _, value = p.partition("=")
        key = key.strip().lower()
        if key.startswith("boundary*"):
            raise HTTPError(400, "RFC 2231 parameters (boundary*) are not supported; send boundary=...")
        if key != "boundary":
            continue
        if found is not None:
            raise HTTPError(400, "Content-Type with two boundary parameters")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if not _BOUNDARY.fullmatch(value):
            raise HTTPError(400, "multipart boundary must be 1 to 70 characters of RFC 2046's set")
        found = value.encode("ascii")
    if found is None:
        raise HTTPError(400, "multipart/form-data without a boundary parameter")
    return found


def parts(body: bytes, bound: bytes) -> list[tuple[int, int]]:
    """The (start, end) of each part of `body` (headers and content), at most MAX_PARTS; one pass, linear."""
    dash = b"--" + bound
    delim = b"\r\n" + dash
    if body.startswith(dash):
        pos = len(dash)
    else:  # a preamble before the first delimiter
        i = body.find(delim)
        if i < 0:
            raise HTTPError(400, "multipart body without its boundary")
        pos = i + len(delim)
    out: list[tuple[int, int]] = []
    while not body.startswith(b"--", pos):  # "--" after a delimiter closes the body; the epilogue is ignored
        eol = body.find(b"\r\n", pos, pos + MAX_PADDING + 2)
        if eol < 0 or body[pos:eol].strip(b" \t"):
            raise HTTPError(400, "malformed multipart body: a boundary line does not end in CRLF")
        if len(out) == MAX_PARTS:
            raise HTTPError(400, f"multipart body with more than {MAX_PARTS} parts")
        start = eol + 2
        end = body.find(delim, start)
        if end < 0:
            raise HTTPError(400, "multipart body without its closing boundary")
        out.append((start, end))
        pos = end + len(delim)
    return out


def part_headers(body: bytes, start: int, end: int) -> tuple[dict[str, str], int]:
    """A part's header fields (lower-case names, first of each) and where its content starts."""
    if body.startswith(b"\r\n", start):
        return {}, start + 2
    stop = body.find(b"\r\n\r\n", start, min(end, start + MAX_PART_HEAD + 4))
    if stop < 0:
        raise HTTPError(400, f"multipart part whose headers exceed {MAX_PART_HEAD} bytes or do not end")
    lines = body[start:stop].split(b"\r\n")
    if len(lines) > MAX_PART_HEADERS:
        raise HTTPError(400, f"multipart part with more than {MAX_PART_HEADERS} header fields")
    fields: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.decode("utf-8", "replace").partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise HTTPError(400, "malformed multipart part header")
        fields.setdefault(name.lower(), value.strip())
    return fields, stop + 4


def disposition(value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="image"; filename="x.jpg"` -> ('form-data', {'name': 'image', 'filename': 'x.jpg'})."""
    kind, _, _ = value.partition(";")
    params: dict[str, str] = {}
    pos = len(kind)
    while pos < len(value):
        m = _PARAM.match(value, pos)
        if not m or m.end() == pos:
            raise HTTPError(400, "malformed Content-Disposition of a multipart part")
        v = (m[2] or "").strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = re.sub(r"\\(.)", r"\1", v[1:-1])
        params.setdefault(m[1].lower(), v)
        pos = m.end()
    return kind.strip().lower(), params


def multipart_file(body: bytes, content_type: str, field: str = "image") -> bytes:
    """The file of a multipart/form-data body: the part named `field`, else the first part with a filename.
    A part whose own Content-Type is multipart is not a file; a transfer encoding (base64, ...) is refused."""
    bound = boundary(content_type)
    named, first = None, None
    for start, end in parts(body, bound):
        fields, content = part_headers(body, start, end)
        kind, params = disposition(fields.get("content-disposition", ""))
        if kind != "form-data" or fields.get("content-type", "").lower().startswith("multipart/"):
            continue
        if params.get("name") == field:
            named = named or (fields, content, end)
        elif first is None and ("filename" in params or "filename*" in params):
            first = (fields, content, end)
    chosen = named or first
    if chosen is None:
        raise HTTPError(400, f"multipart upload without a file; send it as -F {field}=@cat.jpg")
    fields, content, end = chosen
    coding = fields.get("content-transfer-encoding", "").lower()
    if coding not in _IDENTITY:
        raise HTTPError(400, f"Content-Transfer-Encoding {coding[:20]!r} is not supported; send the file's bytes")
    return body[content:end]
