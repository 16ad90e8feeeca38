"""The one strict tar header parser: ``transfer upload``'s check and the GPU side's
extraction both walk archives with :class:`MemberWalker`, so what one accepts the other
accepts (issue 16: a pax size of Unicode digits passed the upload check, then crashed the
worker's ``int()``).

What is accepted (anything else raises :class:`ArchiveRejected`, never another error):

* headers: ustar, GNU and pax; the checksum must match (unsigned or signed sum);
* numbers: the size and checksum fields are ASCII octal (NUL/space padded) or, for the
  size, GNU base-256 (positive only); pax ``size`` is ASCII decimal of at most 20 digits;
  every size is at most :data:`MAX_MEMBER_BYTES`. Other numeric fields (mode, uid, mtime)
  are ignored: extraction sets its own;
* pax records ``"<len> <key>=<value>\\n"`` with an ASCII decimal length, parsed linearly;
  ``GNU.sparse.*`` records are refused. GNU long names (``L``/``K``) are read up to NUL;
* names are bytes until the end, then must be UTF-8: a name that is not cannot be stored
  as text in results or the ledger, so it is refused here rather than at the commit;
* members: regular files and directories only; links, devices, fifos, sparse files and
  unknown types are refused; a name must stay inside the destination (no absolute path,
  no ``..``, no NUL) and within the length and depth limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from stagerd.errors import ArchiveRejected

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
MAX_MEMBER_BYTES = 1 << 44  # 16 TiB: far above any batch, far below absurd
# bytes.translate(None, digits) is empty exactly when every byte is a digit; it runs in C,
# which keeps the check cheap on 10k-member archives (the upload check's hot path).
_OCTAL = b"01234567"
_DECIMAL = b"0123456789"
_MAX_DECIMAL_DIGITS = 20
_MAX_EXTENDED_IN_A_ROW = 8
REGULAR = frozenset(b"0\x007")  # regular, old-style regular, contiguous
DIRECTORY = ord("5")
_PAX, _PAX_GLOBAL, _LONGNAME, _LONGLINK = ord("x"), ord("g"), ord("L"), ord("K")
_EXTENDED = frozenset({_PAX, _PAX_GLOBAL, _LONGNAME, _LONGLINK})
_REFUSED = {
    ord("1"): "hard link",
    ord("2"): "symbolic link",
    ord("3"): "character device",
    ord("4"): "block device",
    ord("6"): "fifo",
    ord("S"): "sparse file",
}


@dataclass(frozen=True)
class HeaderLimits:
    """Caps on names and extended headers (the same on both sides of the wire)."""

    max_path_bytes: int = 4096
    max_depth: int = 64
    max_meta_bytes: int = 1024**2  # one pax header or GNU long name payload


@dataclass(frozen=True)
class Member:
    """One accepted member: a regular file or a directory, with a safe relative path."""

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    offset: int  # of its (first) header


class BlockSource(Protocol):
    """Sequential bytes of an archive; ``offset`` counts what was consumed."""

    @property
    def offset(self) -> int: ...

    def read_exact(self, n: int) -> bytes:
        """Up to *n* bytes; fewer only at the end of the data."""
        ...

    def skip(self, n: int) -> None:
        """Consume *n* bytes; raises ArchiveRejected when the data ends first."""
        ...


def show(name: str | bytes) -> str:
    """A member name safe to put in a message (attacker-controlled, so bounded)."""
    text = repr(name)
    return text if len(text) <= 120 else text[:117] + "..."


def round_up(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


class MemberWalker:
    """Yields the archive's members one by one; the caller consumes each file's data
    (``round_up(size)`` bytes) before asking for the next."""

    def __init__(self, source: BlockSource, limits: HeaderLimits | None = None) -> None:
        self._src = source
        self._limits = limits or HeaderLimits()

    def next(self) -> Member | None:
        """The next member, or None at the first end-of-archive block."""
        name: bytes | None = None
        size: int | None = None
        for _ in range(_MAX_EXTENDED_IN_A_ROW + 1):
            at = self._src.offset
            block = self._src.read_exact(BLOCK)
            if len(block) < BLOCK:
                raise ArchiveRejected(f"archive is truncated at byte {at} (no end marker)")
            if block == ZERO_BLOCK:
                return None
            typeflag, header_name, header_size = _decode(block, at)
            if typeflag not in _EXTENDED:
                return self._member(
                    typeflag, header_name if name is None else name,
                    header_size if size is None else size, at,
                )  # fmt: skip
            data = self._meta(header_size, at)
            if typeflag == _LONGNAME:
                name = data.split(b"\0", 1)[0]
            elif typeflag == _PAX:
                records = parse_pax(data, at)
                name = records.get(b"path", name)
                if b"size" in records:
                    size = pax_size(records[b"size"], at)
            elif typeflag == _PAX_GLOBAL:
                parse_pax(data, at)  # validated; nothing in it applies to us
        raise ArchiveRejected(f"too many extended headers in a row at byte {self._src.offset}")

    def _meta(self, size: int, at: int) -> bytes:
        if size > self._limits.max_meta_bytes:
            raise ArchiveRejected(
                f"extended header at byte {at} is {size} bytes "
                f"(at most {self._limits.max_meta_bytes})"
            )
        data = self._src.read_exact(size)
        if len(data) < size:
            raise ArchiveRejected(f"archive is truncated at byte {self._src.offset}")
        self._src.skip(-size % BLOCK)
        return data

    def _member(self, typeflag: int, raw_name: bytes, size: int, at: int) -> Member:
        kind = _REFUSED.get(typeflag)
        if kind is not None:
            raise ArchiveRejected(f"member {show(raw_name)} is a {kind}: refused")
        # Old tars mark a directory as a regular file whose name ends in "/".
        is_dir = typeflag == DIRECTORY or (typeflag == 0 and raw_name.endswith(b"/"))
        if not is_dir and typeflag not in REGULAR:
            raise ArchiveRejected(f"member {show(raw_name)} has unsupported type {chr(typeflag)!r}")
        if is_dir and size:
            raise ArchiveRejected(f"directory member {show(raw_name)} carries data")
        name = _text(raw_name)
        parts = safe_parts(name, is_dir, self._limits, len(raw_name))
        return Member(name, parts, is_dir, size, at)


def _decode(block: bytes, at: int) -> tuple[int, bytes, int]:
    """(typeflag, name, size) of one header block; checksum verified."""
    _verify_checksum(block, at)
    typeflag = block[156]
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00":  # POSIX ustar: a prefix field (GNU has none)
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return typeflag, name, _size_field(block[124:136], at)


def _verify_checksum(block: bytes, at: int) -> None:
    stored = parse_octal(block[148:156])
    # Summed with its own field read as eight spaces; some old writers summed signed bytes.
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored == unsigned:
        return  # the common case: skip the signed sum (it dominated 10k-member walks)
    signed = unsigned - 256 * sum(1 for b in block[:148] + block[156:] if b > 127)
    if stored is None or stored != signed:
        raise ArchiveRejected(f"corrupt tar header at byte {at}: bad checksum")


def parse_octal(field: bytes) -> int | None:
    """An ASCII octal number field (up to the first NUL, spaces around), or None."""
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not digits:
        return 0
    if digits.translate(None, _OCTAL):
        return None
    return int(digits, 8)


def _size_field(field: bytes, at: int) -> int:
    if field[0] == 0x80:  # GNU base-256, for members of 8 GiB and more
        value: int | None = int.from_bytes(field[1:], "big")
    elif field[0] & 0x80:
        value = None  # negative (0xff) or not a number at all
    else:
        value = parse_octal(field)
    if value is None:
        raise ArchiveRejected(f"corrupt tar header at byte {at}: bad size field")
    return _bounded(value, at)


def _bounded(size: int, at: int) -> int:
    if size > MAX_MEMBER_BYTES:
        raise ArchiveRejected(
            f"corrupt tar header at byte {at}: member size {size} exceeds {MAX_MEMBER_BYTES}"
        )
    return size


def parse_pax(data: bytes, at: int) -> dict[bytes, bytes]:
    """Parse ``"<len> <key>=<value>\\n"`` records in one linear pass (no regex)."""
    records: dict[bytes, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 8)  # a record of at most 1 MiB has <= 7 digits
        digits = data[pos:space] if space > pos else b""
        if not digits or digits.translate(None, _DECIMAL):
            raise ArchiveRejected(f"malformed pax header at byte {at}")
        end = pos + int(digits)
        if end <= space + 2 or end > len(data) or data[end - 1] != 0x0A:
            raise ArchiveRejected(f"malformed pax header at byte {at}")
        key, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq or not key:
            raise ArchiveRejected(f"malformed pax header at byte {at}")
        if key.startswith(b"GNU.sparse."):
            raise ArchiveRejected(f"sparse member (pax header at byte {at}) refused")
        records[key] = value
        pos = end
    return records


def pax_size(value: bytes, at: int) -> int:
    """A pax ``size`` value: plain ASCII decimal, bounded (``int()`` alone takes Unicode
    digits, underscores and signs, and raises on thousands of digits)."""
    if not value or len(value) > _MAX_DECIMAL_DIGITS or value.translate(None, _DECIMAL):
        raise ArchiveRejected(f"malformed pax size at byte {at}: {show(value)}")
    return _bounded(int(value), at)


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ArchiveRejected(f"member name {show(raw)} is not valid UTF-8") from None


def safe_parts(
    name: str, is_dir: bool, limits: HeaderLimits, nbytes: int | None = None
) -> tuple[str, ...]:
    """*name* (*nbytes* long in UTF-8, when the caller knows) as components that cannot
    leave the destination directory."""
    if "\0" in name:
        raise ArchiveRejected(f"member {show(name)} has a NUL byte in its name")
    if name.startswith("/"):
        raise ArchiveRejected(f"member {show(name)} has an absolute path")
    if (len(name.encode("utf-8")) if nbytes is None else nbytes) > limits.max_path_bytes:
        raise ArchiveRejected(f"member {show(name)} has a name over {limits.max_path_bytes} bytes")
    parts = tuple([part for part in name.split("/") if part and part != "."])
    if ".." in parts:
        raise ArchiveRejected(f"member {show(name)} has a '..' component")
    if len(parts) > limits.max_depth:
        raise ArchiveRejected(f"member {show(name)} is nested over {limits.max_depth} deep")
    if not parts and not is_dir:
        raise ArchiveRejected(f"member {show(name)} has an empty name")
    return parts
