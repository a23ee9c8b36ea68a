"""The central directory of a zip archive, read with the checks torch's reader (miniz) makes.

torch reads `.pt` files with miniz (`mz_zip_reader_read_central_dir`); Python's `zipfile`
accepts archives miniz refuses (a multi-disk end record, sizes that disagree with the storage
method, ...) and raises a dozen exception types for damaged bytes. This parser reads the
(zip64) end of central directory and every central header with miniz's checks, plus stricter
ones of this project (one record per name, UTF-8 names, bounds on every offset), and raises
only `ZipError`. It costs one pass over the central directory: entries are small objects,
about 10x the 46+ bytes of their headers.
"""

from __future__ import annotations

import dataclasses
import struct

EOCD = struct.Struct("<4sHHHHIIH")  # signature, this disk, directory's disk, entries here, entries, size, offset, comment
ZIP64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk of the zip64 record, its offset, disks
ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")  # signature, record size, made by, needed, disks, entries x2, size, offset
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # see `_entry`
LOCAL_SIZE = 30
_MAX32, _MAX16 = 0xFFFFFFFF, 0xFFFF


class ZipError(Exception):
    """The archive's structure is damaged or outside what torch's reader accepts."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One central directory record."""

    name: str
    raw_name: bytes
    flags: int
    method: int
    crc: int
    compressed_size: int
    size: int
    local_offset: int
    is_directory: bool  # as miniz decides: a name ending in "/" or the MS-DOS directory attribute


def _end_record(buffer) -> int:
    """Offset of the end-of-central-directory record: the last signature in the final 64 KiB."""
    size = len(buffer)
    if size < EOCD.size:
        raise ZipError("too short for a zip archive")
    low = max(0, size - (_MAX16 + EOCD.size))
    tail = bytes(buffer[low:])
    at = tail.rfind(b"PK\x05\x06", 0, len(tail) - EOCD.size + 4)
    if at < 0:
        raise ZipError("no end of central directory record")
    return low + at


def _zip64_extra(extra: bytes, size: int, compressed: int, offset: int) -> tuple[int, int, int]:
    """The 64-bit values of the fields a central header set to 0xFFFFFFFF (extra field 0x0001)."""
    at = 0
    while at + 4 <= len(extra):
        field, length = struct.unpack_from("<HH", extra, at)
        if at + 4 + length > len(extra):
            raise ZipError("an extra field runs past its header")
        if field == 0x0001:
            values = list(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            fixed = []
            for value in (size, compressed, offset):
                if value == _MAX32:
                    if not values:
                        raise ZipError("a zip64 extra field lacks a value")
                    value = values.pop(0)
                fixed.append(value)
            return fixed[0], fixed[1], fixed[2]
        at += 4 + length
    if at != len(extra):
        raise ZipError("a malformed extra field")
    return size, compressed, offset


def read_directory(buffer) -> list[Entry]:
    """Every central directory entry of the zip archive in `buffer`, in directory order.

    Raises:
      ZipError: naming what is wrong.
    """
    size = len(buffer)
    end = _end_record(buffer)
    _, disk, cdir_disk, here, total, cdir_size, cdir_offset, _ = EOCD.unpack_from(buffer, end)
    if end >= ZIP64_LOCATOR.size + ZIP64_EOCD.size:
        signature, _, offset64, disks = ZIP64_LOCATOR.unpack_from(buffer, end - ZIP64_LOCATOR.size)
        if signature == b"PK\x06\x07":
            if offset64 > size - ZIP64_EOCD.size:
                raise ZipError("the zip64 end record lies outside the file")
            fields = ZIP64_EOCD.unpack_from(buffer, offset64)
            if fields[0] == b"PK\x06\x06":
                if fields[1] < ZIP64_EOCD.size - 12:
                    raise ZipError("a zip64 end record too short")
                if disks != 1:
                    raise ZipError("a multi-disk archive")
                disk, cdir_disk, here, total, cdir_size, cdir_offset = fields[4:10]
                if total > _MAX32 or here > _MAX32 or cdir_size > _MAX32:
                    raise ZipError("more entries or a larger directory than torch reads")
    if total != here or ((disk | cdir_disk) != 0 and (disk != 1 or cdir_disk != 1)):
        raise ZipError("a multi-disk archive")
    if cdir_size < total * CENTRAL.size or cdir_offset + cdir_size > size:
        raise ZipError("the central directory does not fit the file")
    entries, at, left = [], cdir_offset, cdir_size
    for _ in range(total):
        if left < CENTRAL.size:
            raise ZipError("the central directory ends early")
        entry, length = _entry(buffer, at, left, disk, size)
        entries.append(entry)
        at, left = at + length, left - length
    return entries


def _entry(buffer, at: int, left: int, disk: int, file_size: int) -> tuple[Entry, int]:
    (signature, _, _, flags, method, _, _, crc, compressed, size, name_length, extra_length, comment_length,
     disk_start, _, external, offset) = CENTRAL.unpack_from(buffer, at)
    if signature != b"PK\x01\x02":
        raise ZipError("a central directory header without its signature")
    length = CENTRAL.size + name_length + extra_length + comment_length
    if length > left:
        raise ZipError("a central directory header runs past the directory")
    raw_name = bytes(buffer[at + CENTRAL.size : at + CENTRAL.size + name_length])
    shown = raw_name[:200].decode("utf-8", "replace")
    if _MAX32 not in (compressed, size) and ((method == 0 and size != compressed) or (size and not compressed)):
        raise ZipError(f"record {shown}: its sizes disagree with its storage method")
    if _MAX32 in (compressed, size, offset):
        extra = bytes(buffer[at + CENTRAL.size + name_length : at + CENTRAL.size + name_length + extra_length])
        size, compressed, offset = _zip64_extra(extra, size, compressed, offset)
    if disk_start == _MAX16 or (disk_start != disk and disk_start != 1):
        raise ZipError("a multi-disk archive")
    if offset + LOCAL_SIZE + compressed > file_size:
        raise ZipError(f"record {shown} lies outside the file")
    if flags & 0x2000:
        raise ZipError("an encrypted central directory")
    try:
        name = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise ZipError(f"record {shown}: a name that is not UTF-8") from None
    is_directory = raw_name.endswith(b"/") or bool(external & 0x10)
    return Entry(name, raw_name, flags, method, crc, compressed, size, offset, is_directory), length
