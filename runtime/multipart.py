"""The file of a multipart/form-data upload (`curl -F image=@cat.jpg`), for both REST servers (through the data
plane): a parser whose work is bounded by the body's size and small. The boundary is read from the
Content-Type (its length and parameter count capped; RFC 2231 continuations refused), parts are found with
`bytes.find` on the delimiter (linear), at most MAX_PARTS of them, each with at most MAX_PART_HEAD bytes of
headers; a nested multipart part is bytes, not a file, and is never descended into. Every mistake is an
`HTTPError` 400 with one sentence. `PartScanner` walks a body as it arrives, so that a server refuses a
flood from its first bytes without reading the rest. Standard library only.
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


class PartScanner:
    """`parts` as the body arrives: `feed` it the body read so far (one buffer that only grows, its first `n`
    bytes valid) after each read, and a refusal (more than MAX_PARTS parts, a part's headers past
    MAX_PART_HEAD, a malformed delimiter line) is raised as soon as the bytes in hand make it certain, so
    that a server can answer it without reading the rest. Each byte is searched about once over all feeds."""

    def __init__(self, bound: bytes):
        self.dash = b"--" + bound
        self.delim = b"\r\n" + self.dash
        self.pos: int | None = None  # just after the last delimiter; None: the first one not yet found
        self.search = 0              # where the search for the next delimiter resumes
        self.start: int | None = None  # the open part's first byte (its headers); None: after a delimiter
        self.checked = False         # the open part's headers checked
        self.parts: list[tuple[int, int]] = []
        self.done = False            # the closing delimiter seen: the epilogue is ignored

    def feed(self, buf, n: int | None = None, final: bool = False) -> list[tuple[int, int]]:
        """Walk `buf[:n]` on from where the last feed stopped; with `final`, it is the whole body. The
        (start, end) of each part found so far."""
        n = len(buf) if n is None else n
        dash, delim = self.dash, self.delim
        while not self.done:
            if self.pos is None:  # the first delimiter, maybe after a preamble
                if buf.startswith(dash, 0, n):
                    self.pos = len(dash)
                    continue
                if n < len(dash) and not final:
                    return self.parts
                i = buf.find(delim, self.search, n)
                if i < 0:
                    if final:
                        raise HTTPError(400, "multipart body without its boundary")
                    self.search = max(0, n - len(delim) + 1)
                    return self.parts
                self.pos = i + len(delim)
            elif self.start is None:  # after a delimiter: "--" closes the body, else padding and CRLF
                pos = self.pos
                if n < pos + 2 and not final:
                    return self.parts
                if buf.startswith(b"--", pos, n):
                    self.done = True
                    break
                eol = buf.find(b"\r\n", pos, min(n, pos + MAX_PADDING + 2))
                if eol < 0 and n < pos + MAX_PADDING + 2 and not final:
                    return self.parts
                if eol < 0 or buf[pos:eol].strip(b" \t"):
                    raise HTTPError(400, "malformed multipart body: a boundary line does not end in CRLF")
                if len(self.parts) == MAX_PARTS:
                    raise HTTPError(400, f"multipart body with more than {MAX_PARTS} parts")
                self.start = self.search = eol + 2
                self.checked = False
            else:  # in a part: its end, the next delimiter
                start = self.start
                end = buf.find(delim, self.search, n)
                if not self.checked and (end >= 0 or final or n >= start + MAX_PART_HEAD + 4):
                    part_headers(buf, start, end if end >= 0 else n)  # raises when they are too long
                    self.checked = True
                if end < 0:
                    if final:
                        raise HTTPError(400, "multipart body without its closing boundary")
                    self.search = max(start, n - len(delim) + 1)
                    return self.parts
                self.parts.append((start, end))
                self.pos, self.start = end + len(delim), None
        return self.parts


def scanner(content_type: str) -> PartScanner | None:
    """A `PartScanner` for a multipart/form-data request (its Content-Type checked now, before any of the
    body is read: 400), else None."""
    if content_type[:19].lower() != "multipart/form-data":
        return None
    return PartScanner(boundary(content_type))


def parts(body: bytes, bound: bytes) -> list[tuple[int, int]]:
    """The (start, end) of each part of `body` (headers and content), at most MAX_PARTS; one pass, linear."""
    return PartScanner(bound).feed(body, final=True)


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
    return bytes(body[content:end])  # a server may read the body into a bytearray
